"""Every knob of the Images API simulator, changeable at runtime.

`SimConfig` is a plain mutable dataclass. The running app reads it on every request, so
`config.update(ipm=5)` (or `POST /v1/_sim/config {"ipm": 5}`) takes effect for the next
request. Values are validated and coerced (strings from a CLI or numbers from JSON) by
`from_dict` and `update`; an invalid update changes nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

LATENCY_KINDS = ("fixed", "uniform", "longtail")
ERROR_STYLES = ("openai", "litellm", "fastapi")


@dataclass(frozen=True)
class LatencyModel:
    """A parsed latency distribution; `sample(rng)` returns seconds."""

    kind: str = "fixed"
    a: float = 0.0  # fixed: seconds; uniform: min; longtail: median
    b: float = 0.0  # uniform: max; longtail: cap
    sigma: float = 0.8  # longtail: spread of the lognormal

    def sample(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        value = rng.lognormvariate(math.log(self.a), self.sigma) if self.a > 0 else 0.0
        return min(value, self.b)

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.a:g}"
        if self.kind == "uniform":
            return f"uniform:{self.a:g},{self.b:g}"
        return f"longtail:{self.a:g},{self.b:g},{self.sigma:g}"


def parse_latency(value: Any) -> LatencyModel:
    """Accepts 0.05, "0.05", "fixed:0.05", "uniform:0.1,0.5", "longtail:MEDIAN,CAP[,SIGMA]",
    or a mapping {"kind": "uniform", "min": .., "max": ..} / {"kind": "longtail", "median": .., "cap": .., "sigma": ..}.
    """
    if isinstance(value, LatencyModel):
        return value
    if isinstance(value, bool):
        raise ValueError(f"latency must be a number or a distribution spec, got {value!r}")
    if isinstance(value, (int, float)):
        model = LatencyModel("fixed", float(value))
    elif isinstance(value, Mapping):
        kind = str(value.get("kind", "fixed"))
        if kind == "fixed":
            model = LatencyModel("fixed", float(value.get("seconds", value.get("value", 0.0))))
        elif kind == "uniform":
            model = LatencyModel("uniform", float(value["min"]), float(value["max"]))
        elif kind == "longtail":
            model = LatencyModel(
                "longtail",
                float(value["median"]),
                float(value["cap"]),
                float(value.get("sigma", 0.8)),
            )
        else:
            raise ValueError(f"latency kind must be one of {LATENCY_KINDS}, got {kind!r}")
    elif isinstance(value, str):
        text = value.strip()
        kind, _, rest = text.partition(":")
        if not rest:
            kind, rest = "fixed", text
        kind = kind.strip().lower()
        try:
            nums = [float(x) for x in rest.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"latency {value!r}: numbers expected") from None
        if kind == "fixed" and len(nums) == 1:
            model = LatencyModel("fixed", nums[0])
        elif kind == "uniform" and len(nums) == 2:
            model = LatencyModel("uniform", nums[0], nums[1])
        elif kind == "longtail" and len(nums) in (2, 3):
            model = LatencyModel("longtail", nums[0], nums[1], nums[2] if len(nums) == 3 else 0.8)
        else:
            raise ValueError(
                f"latency {value!r}: use SECONDS, fixed:S, uniform:MIN,MAX or longtail:MEDIAN,CAP[,SIGMA]"
            )
    else:
        raise ValueError(f"latency must be a number or a distribution spec, got {value!r}")
    if model.a < 0 or model.b < 0 or model.sigma < 0:
        raise ValueError(f"latency {value!r}: values must be >= 0")
    if model.kind == "uniform" and model.b < model.a:
        raise ValueError(f"latency {value!r}: max < min")
    if model.kind == "longtail" and model.b < model.a:
        raise ValueError(f"latency {value!r}: cap < median")
    return model


@dataclass
class SimConfig:
    # auth
    api_key: str | None = None  # None: any non-empty Bearer key (or Azure api-key) is accepted
    organization: str = "org-sim"  # used in rate-limit messages and the openai-organization header
    # latency (seconds): a number, "fixed:S", "uniform:MIN,MAX" or "longtail:MEDIAN,CAP[,SIGMA]"
    latency: float | str = 0.0
    latency_per_image: float = 0.0  # added for each image after the first in one request
    seed: int = 0  # seeds latency sampling and fault injection
    # rate limits, exact sliding window; 0 = unlimited
    rpm: int = 0
    ipm: int = 0
    window_seconds: float = 60.0
    # images billed before every request gets 429 insufficient_quota; 0 = unlimited
    quota_images: int = 0
    # what an exhausted quota answers: 429 "insufficient_quota" or 400 "billing_hard_limit_reached"
    quota_error: str = "insufficient_quota"
    # prompts containing this word (case-insensitive) are refused; "" disables
    moderation_word: str = "forbidden"
    # fault injection, probabilities per admitted request (their sum must be <= 1)
    error_rate: float = 0.0  # 500 server_error or an overload (overload_status)
    overload_status: int = 503  # 503, or 429 as some servers answer an overload
    stall_rate: float = 0.0  # wait stall_seconds before answering
    stall_seconds: float = 600.0
    drop_rate: float = 0.0  # bill, then close the connection without a response
    malformed_rate: float = 0.0  # bill, then answer 200 with a broken body
    # DALL·E url responses
    url_ttl: float = 3600.0
    # 404 model_not_found for models whose registry `retired` date has passed
    refuse_retired: bool = False
    # share of rate-limit 429s sent without retry-after headers (the real header "may be
    # omitted"); the message's "try again in" is then the only hint
    omit_retry_after_rate: float = 0.25
    # error bodies as "openai" sends them, as a "litellm" proxy rewrites them (code "400",
    # prefixed message), or as a "fastapi" server validates (422 {"detail": [...]})
    error_style: str = "openai"
    # x-ratelimit-reset-* as Go "duration"s (OpenAI) or absolute "unix" times (some servers)
    reset_format: str = "duration"
    # x-ratelimit-* headers on answers; False: a server that only says 429 (with retry-after),
    # so a client must find the limit from refusals
    ratelimit_headers: bool = True
    # a client that disconnects during latency/stall is billed anyway (as OpenAI might)
    bill_on_disconnect: bool = False
    # Batch API (/v1/batches): seconds in `validating`, per line while `in_progress`, and in
    # `finalizing`; the completion window (lines not run by then end `batch_expired`);
    # `batch_hold` keeps batches in_progress without running lines until set back to false.
    batch_validating_seconds: float = 0.0
    batch_seconds_per_line: float = 0.0
    batch_finalizing_seconds: float = 0.0
    batch_expire_seconds: float = 86400.0
    batch_hold: bool = False
    # a batch line whose prompt contains this word fails with 500 server_error; "" disables
    batch_error_word: str = "batchfail"
    # input file limits (the official ones are 50,000 requests and 200 MB)
    batch_max_lines: int = 50_000
    batch_max_bytes: int = 200 * 1024 * 1024
    # answer delays after the object exists (crash windows): upload, batch create, and a
    # pause between 64 KiB chunks of file content
    files_upload_delay: float = 0.0
    batch_create_delay: float = 0.0
    files_content_chunk_delay: float = 0.0
    # rendering
    # Tests: hold every request until this many are in flight at once, then release them all
    # (0: off). Proves a client really has that many outstanding; released after 60 s anyway.
    hold_until_in_flight: int = 0
    render_text: bool = True
    cache_size: int = 512  # encoded images kept in the LRU cache

    def __post_init__(self) -> None:
        # Coerce direct constructor arguments too (e.g. rpm=5.0 from a float CLI flag -> 5).
        for name in _FIELDS:
            object.__setattr__(self, name, _coerce(name, getattr(self, name)))
        self._validate()

    # ----------------------------------------------------------------- helpers
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, **kwargs: Any) -> SimConfig:
        merged = {**(data or {}), **kwargs}
        _check_keys(merged)
        return cls(**{k: _coerce(k, v) for k, v in merged.items()})

    def update(self, data: Mapping[str, Any] | None = None, **kwargs: Any) -> SimConfig:
        """Change knobs in place; all-or-nothing. Returns self."""
        merged = {**(data or {}), **kwargs}
        _check_keys(merged)
        new = {k: _coerce(k, v) for k, v in merged.items()}
        old = {k: getattr(self, k) for k in new}
        for k, v in new.items():
            setattr(self, k, v)
        try:
            self._validate()
        except ValueError:
            for k, v in old.items():
                setattr(self, k, v)
            raise
        return self

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if redact and data["api_key"]:
            data["api_key"] = "***"
        return data

    def latency_model(self) -> LatencyModel:
        return parse_latency(self.latency)

    def _validate(self) -> None:
        parse_latency(self.latency)
        for name in ("rpm", "ipm", "quota_images", "cache_size", "hold_until_in_flight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in (
            "latency_per_image",
            "stall_seconds",
            "url_ttl",
            "batch_validating_seconds",
            "batch_seconds_per_line",
            "batch_finalizing_seconds",
            "batch_expire_seconds",
            "batch_max_lines",
            "batch_max_bytes",
            "files_upload_delay",
            "batch_create_delay",
            "files_content_chunk_delay",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.window_seconds <= 0:
            raise ValueError("window_seconds must be > 0")
        if not 0.0 <= self.omit_retry_after_rate <= 1.0:
            raise ValueError("omit_retry_after_rate must be within 0..1")
        if self.error_style not in ERROR_STYLES:
            raise ValueError(f"error_style must be one of {', '.join(ERROR_STYLES)}")
        if self.overload_status not in (429, 503):
            raise ValueError("overload_status must be 503 or 429")
        if self.quota_error not in ("insufficient_quota", "billing_hard_limit_reached"):
            raise ValueError("quota_error must be insufficient_quota or billing_hard_limit_reached")
        if self.reset_format not in ("duration", "unix"):
            raise ValueError("reset_format must be 'duration' or 'unix'")
        rates = ("error_rate", "stall_rate", "drop_rate", "malformed_rate")
        for name in rates:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1")
        if sum(getattr(self, n) for n in rates) > 1.0 + 1e-9:
            raise ValueError("error_rate + stall_rate + drop_rate + malformed_rate must be <= 1")


_FIELDS = {f.name: f for f in fields(SimConfig)}
_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off"}


def _check_keys(data: Mapping[str, Any]) -> None:
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown simulator setting(s) {unknown}; known: {sorted(_FIELDS)}")


def _coerce(name: str, value: Any) -> Any:
    default = _FIELDS[name].default
    try:
        if name == "latency":
            if isinstance(value, Mapping):
                return parse_latency(value).describe()
            parse_latency(value)
            return value
        if name == "api_key":
            return None if value in (None, "") else str(value)
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _BOOL_TRUE | _BOOL_FALSE:
                return value.strip().lower() in _BOOL_TRUE
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: invalid value {value!r}") from None
    return value
