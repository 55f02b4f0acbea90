"""An OpenAI-compatible Images API served by Starlette, for tests, benchmarks and offline runs.

Per-model rules come from the model registry (`configs/models.toml`), never from this file.
Request flow for the three image endpoints:

    auth -> parse + validate (400/404, not counted) -> quota (429 insufficient_quota)
    -> RPM/IPM sliding window (429 rate_limit_exceeded, not counted) -> moderation (400)
    -> latency (+ stall) -> fault injection (500/503, drop, malformed) -> render, bill, 200

Images are billed when the response is produced (for drops and malformed bodies too),
never for requests rejected before that.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import hashlib
import io
import json
import logging
import math
import random
import re
import secrets
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from imagebatch.configs.registry import OPTIONAL_PARAMS, ModelSpec, Registry

from .config import SimConfig
from .limits import Quota, RateLimits, Rejection, go_duration
from .render import CONTENT_TYPES, RenderCache, render_image

log = logging.getLogger("imagebatch.simulator")

# --------------------------------------------------------------------------- request rules
DEFAULT_MODEL = {
    "generate": "dall-e-2",
    "edit": "gpt-image-1.5",
    "edit_json": "gpt-image-1.5",
    "variation": "dall-e-2",
}
ENDPOINT_OF = {
    "generate": "generate",
    "edit": "edit",
    "edit_json": "edit",
    "variation": "variation",
}
LABEL = {"generate": "generations", "edit": "edits", "variation": "variations"}
# parameters every model takes on an operation (GPT_ONLY ones need a GPT image model)
CORE = {
    "generate": {"prompt", "model", "n", "size", "quality"},
    "edit": {"image", "image[]", "mask", "prompt", "model", "n", "size", "quality"},
    "edit_json": {"images", "mask", "prompt", "model", "n", "size", "quality"},
    "variation": {"image", "image[]", "model", "n", "size"},
}
GPT_ONLY = {"stream", "partial_images"}
UNIVERSAL = {"safety_identifier"}
# registry-governed optional parameters that make sense per operation
OPTIONAL = {
    "generate": set(OPTIONAL_PARAMS) - {"input_fidelity"},
    "edit": set(OPTIONAL_PARAMS) - {"style"},
    "edit_json": set(OPTIONAL_PARAMS) - {"style", "response_format"},
    "variation": {"response_format", "user"},
}
ENUMS = {
    "response_format": ("url", "b64_json"),
    "style": ("vivid", "natural"),
    "output_format": ("png", "jpeg", "webp"),
    "background": ("transparent", "opaque", "auto"),
    "moderation": ("low", "auto"),
    "input_fidelity": ("high", "low"),
}
JSON_EDIT_SIZES = ("auto", "1024x1024", "1536x1024", "1024x1536")
DATA_URL_MAX = 20_971_520
# output image tokens for a 1024x1024 image by quality (gpt-image-1 figures; scaled by pixels)
OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160, "xhigh": 8320, "max": 16640}
URL_GRACE = 300.0  # expired URL tokens answer 410 for this long, then 404


class ApiFailure(Exception):
    """An error answer in the API's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
                **self.extra,
            }
        }


def _bad(param: str | None, message: str, code: str | None = "invalid_value") -> ApiFailure:
    return ApiFailure(400, message, "invalid_request_error", param, code)


def _unknown(param: str, model: str) -> ApiFailure:
    return _bad(
        param,
        f"Unknown parameter: '{param}'. (Not accepted by model '{model}'.)",
        "unknown_parameter",
    )


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------- parsed request
@dataclass
class InputImage:
    data: bytes
    format: str  # png / jpeg / webp / gif ...
    width: int
    height: int
    has_alpha: bool


@dataclass
class Parsed:
    op: str  # generate / edit / edit_json / variation
    model: str
    spec: ModelSpec
    prompt: str
    n: int
    width: int
    height: int
    quality: str | None  # resolved for echo and usage
    output_format: str
    compression: int | None
    background: str  # resolved: opaque / transparent
    response_format: str  # url / b64_json
    style: str | None
    inputs: list[InputImage] = field(default_factory=list)

    @property
    def render_key(self) -> str:
        if self.op == "variation":
            return f"[variation] {hashlib.sha256(self.inputs[0].data).hexdigest()[:12]}"
        if self.op in ("edit", "edit_json"):
            return f"[edit] {self.prompt}"
        return self.prompt


class _Params:
    """Typed access to request fields from JSON (typed) or multipart (all strings)."""

    def __init__(self, raw: dict[builtins.str, Any], form: bool) -> None:
        self.raw = raw
        self.form = form

    def has(self, name: builtins.str) -> bool:
        return name in self.raw

    def str(self, name: builtins.str) -> builtins.str | None:
        if name not in self.raw:
            return None
        value = self.raw[name]
        if not isinstance(value, str):
            raise _bad(
                name,
                f"Invalid type for '{name}': expected a string, but got {_type_name(value)} instead.",
                "invalid_type",
            )
        return value

    def int(self, name: builtins.str) -> int | None:
        if name not in self.raw:
            return None
        value = self.raw[name]
        if self.form and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        elif isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad(
            name,
            f"Invalid type for '{name}': expected an integer, but got {_type_name(value)} instead.",
            "invalid_type",
        )

    def bool(self, name: builtins.str) -> bool | None:
        if name not in self.raw:
            return None
        value = self.raw[name]
        if isinstance(value, bool):
            return value
        if self.form and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _bad(
            name,
            f"Invalid type for '{name}': expected a boolean, but got {_type_name(value)} instead.",
            "invalid_type",
        )

    def enum(
        self, name: builtins.str, allowed: tuple[builtins.str, ...] | list[builtins.str]
    ) -> builtins.str | None:
        value = self.str(name)
        if value is not None and value not in allowed:
            listed = ", ".join(f"'{a}'" for a in allowed)
            raise _bad(name, f"Invalid value: '{value}'. Supported values are: {listed}.")
        return value


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a decimal",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _inspect_image(data: bytes, param: str) -> InputImage:
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
            mode = im.mode
            has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
            width, height = im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise _bad(
            param,
            f"Invalid image file for '{param}': the data is not a readable image.",
            "invalid_image",
        ) from None
    return InputImage(data, "jpeg" if fmt == "jpg" else fmt, width, height, has_alpha)


_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[^,;]*)*?);base64,(.*)$", re.S)


def _decode_data_url(value: Any, param: str) -> bytes:
    if not isinstance(value, str):
        raise _bad(
            param,
            f"Invalid type for '{param}': expected a string, but got {_type_name(value)} instead.",
            "invalid_type",
        )
    if len(value) > DATA_URL_MAX:
        raise _bad(
            param,
            f"Invalid '{param}': string too long. Expected a string with maximum length {DATA_URL_MAX}, but got a string with length {len(value)} instead.",
            "string_above_max_length",
        )
    m = _DATA_URL.match(value)
    if not m:
        raise _bad(
            param,
            f"Invalid '{param}': the simulator only accepts base64 data URLs (data:image/png;base64,...), not remote URLs.",
            "invalid_image_url",
        )
    try:
        return base64.b64decode(re.sub(r"\s+", "", m.group(3)), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(
            param, f"Invalid '{param}': the data URL is not valid base64.", "invalid_image_url"
        ) from None


def _edit_auto_size(first: InputImage | None) -> tuple[int, int]:
    if first is None:
        return 1024, 1024
    ratio = first.width / max(1, first.height)
    if ratio > 1.2:
        return 1536, 1024
    if ratio < 1 / 1.2:
        return 1024, 1536
    return 1024, 1024


def _image_tokens(width: int, height: int) -> int:
    """Input image tokens, tile-based like OpenAI's vision pricing."""
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 65 + 129 * math.ceil(w / 512) * math.ceil(h / 512)


def _revised_prompt(prompt: str, style: str | None) -> str:
    words = "vivid, dramatic" if style != "natural" else "natural, true-to-life"
    text = prompt.strip().rstrip(".!? ")
    return (
        f"A {words} image depicting {text[:1].lower() + text[1:]}, with a balanced composition, "
        f"carefully rendered lighting and rich detail throughout the scene."
    )


# --------------------------------------------------------------------------- state
class Stats:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests_seen = 0
        self.requests_ok = 0
        self.images_billed = 0
        self.status: Counter[str] = Counter()
        self.rate_limited = 0
        self.quota_exceeded = 0
        self.moderated = 0
        self.faults: Counter[str] = Counter()
        self.client_disconnects = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.per_model: dict[str, Counter[str]] = {}
        self.per_endpoint: Counter[str] = Counter()
        self.files_served = 0

    def model(self, name: str) -> Counter[str]:
        if name not in self.per_model:
            self.per_model[name] = Counter(requests=0, ok=0, images=0)
        return self.per_model[name]

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests_seen": self.requests_seen,
            "requests_ok": self.requests_ok,
            "images_billed": self.images_billed,
            "status": dict(sorted(self.status.items())),
            "rate_limited": self.rate_limited,
            "quota_exceeded": self.quota_exceeded,
            "moderated": self.moderated,
            "faults": {k: self.faults.get(k, 0) for k in ("error", "stall", "drop", "malformed")},
            "client_disconnects": self.client_disconnects,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "per_model": {m: dict(c) for m, c in sorted(self.per_model.items())},
            "per_endpoint": dict(self.per_endpoint),
            "files_served": self.files_served,
            "uptime_seconds": round(time.time() - self.started, 3),
        }


class FileStore:
    """Images behind DALL·E-style URLs: token -> (bytes, content type, expiry)."""

    MAX_ITEMS = 50_000

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()

    def put(self, data: bytes, content_type: str, ttl: float, now: float) -> str:
        self.purge(now)
        token = secrets.token_urlsafe(24)
        self._items[token] = (data, content_type, now + ttl)
        while len(self._items) > self.MAX_ITEMS:
            self._items.popitem(last=False)
        return token

    def get(self, token: str, now: float) -> tuple[bytes, str] | str | None:
        item = self._items.get(token)
        if item is None:
            return None
        data, ctype, expires = item
        if now >= expires:
            return "expired"
        return data, ctype

    def purge(self, now: float) -> None:
        items = self._items
        while items:
            _token, (_, _, expires) = next(iter(items.items()))
            if expires + URL_GRACE > now:
                break
            items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


class SimState:
    def __init__(self, config: SimConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.limits = RateLimits()
        self.quota = Quota()
        self.stats = Stats()
        self.files = FileStore()
        self.cache = RenderCache(config.cache_size)
        self.rng = random.Random(config.seed)
        self._seed = config.seed

    def sync(self) -> None:
        """Pick up config changes made directly on the dataclass."""
        if self.config.seed != self._seed:
            self._seed = self.config.seed
            self.rng.seed(self._seed)
        self.cache.maxsize = self.config.cache_size

    def reset(self) -> None:
        self.limits.clear()
        self.quota.clear()
        self.stats = Stats()
        self._seed = self.config.seed
        self.rng.seed(self._seed)


# --------------------------------------------------------------------------- special responses
class _Silent(Response):
    """The client has gone away: send nothing."""

    def __init__(self) -> None:
        super().__init__(status_code=499)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


class _Drop(Response):
    """Close the connection without any response bytes (client sees a transport error)."""

    def __init__(self) -> None:
        super().__init__(status_code=599)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cycle = getattr(receive, "__self__", None)
        transport = getattr(cycle, "transport", None)
        if transport is not None and hasattr(transport, "abort"):
            transport.abort()
            for _ in range(5):  # let uvicorn notice connection_lost, so it logs nothing
                await asyncio.sleep(0)
                if getattr(cycle, "disconnected", True):
                    break
            return
        # Unknown server: start a response and break it off mid-body.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"created":', "more_body": True})
        raise ConnectionAbortedError("simulated connection drop")


# --------------------------------------------------------------------------- the app
class Simulator:
    def __init__(self, config: SimConfig, registry: Registry) -> None:
        self.state = SimState(config, registry)

    @property
    def config(self) -> SimConfig:
        return self.state.config

    # ---------------------------------------------------------------- image endpoints
    async def generations(self, request: Request) -> Response:
        return await self._images(request, "generate")

    async def edits(self, request: Request) -> Response:
        return await self._images(request, "edit")

    async def variations(self, request: Request) -> Response:
        return await self._images(request, "variation")

    async def azure(self, request: Request) -> Response:
        op = {"generations": "generate", "edits": "edit", "variations": "variation"}.get(
            request.path_params["op"]
        )
        if op is None:
            raise HTTPException(404)
        return await self._images(request, op, default_model=request.path_params.get("deployment"))

    async def _images(
        self, request: Request, operation: str, default_model: str | None = None
    ) -> Response:
        t0 = time.perf_counter()
        st = self.state.stats
        st.requests_seen += 1
        st.per_endpoint[LABEL[operation]] += 1
        st.in_flight += 1
        st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
        extra_headers: dict[str, str] = {}
        try:
            try:
                response = await self._process(request, operation, default_model)
            except ApiFailure as exc:
                response = Response(
                    _json_bytes(exc.body()), exc.status, media_type="application/json"
                )
                extra_headers = exc.headers
            except Exception:
                log.exception("simulator bug while handling %s", request.url.path)
                failure = ApiFailure(
                    500, "The simulator failed while processing your request.", "server_error"
                )
                response = Response(_json_bytes(failure.body()), 500, media_type="application/json")
        finally:
            self.state.stats.in_flight -= 1
        if isinstance(response, (_Silent, _Drop)):
            return response
        self.state.stats.status[str(response.status_code)] += 1
        cfg = self.config
        headers = response.headers
        headers["x-request-id"] = "req_" + secrets.token_hex(16)
        headers["openai-processing-ms"] = str(int((time.perf_counter() - t0) * 1000))
        headers["openai-organization"] = cfg.organization
        headers["openai-version"] = "2020-10-01"
        for k, v in self.state.limits.headers(cfg.rpm, cfg.ipm, cfg.window_seconds).items():
            headers[k] = v
        for k, v in extra_headers.items():
            headers[k] = v
        return response

    async def _process(
        self, request: Request, operation: str, default_model: str | None
    ) -> Response:
        state = self.state
        state.sync()
        cfg = self.config
        self._auth(request)
        parsed = await self._parse(request, operation, default_model)
        st = state.stats
        st.model(parsed.model)["requests"] += 1
        n = parsed.n

        if not state.quota.try_reserve(n, cfg.quota_images):
            st.quota_exceeded += 1
            raise ApiFailure(
                429,
                "You exceeded your current quota, please check your plan and billing details. For more "
                "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
                "insufficient_quota",
                None,
                "insufficient_quota",
            )
        reserved = [n]

        def bill() -> None:
            state.quota.bill(reserved[0])
            reserved[0] = 0
            st.images_billed += n
            st.model(parsed.model)["images"] += n

        try:
            rejection = state.limits.admit(n, cfg.rpm, cfg.ipm, cfg.window_seconds)
            if rejection is not None:
                st.rate_limited += 1
                raise self._rate_limit_failure(parsed.model, rejection)

            word = cfg.moderation_word.strip().lower()
            if word and word in parsed.prompt.lower():
                st.moderated += 1
                raise self._moderation_failure(parsed)

            rng = state.rng
            delay = cfg.latency_model().sample(rng) + max(0, n - 1) * cfg.latency_per_image
            u, u2 = rng.random(), rng.random()
            fault = None
            edge = 0.0
            for name in ("error", "stall", "drop", "malformed"):
                edge += getattr(cfg, f"{name}_rate")
                if u < edge:
                    fault = name
                    break
            if fault == "stall":
                st.faults["stall"] += 1
                delay += cfg.stall_seconds
            if delay > 0 and not await _sleep_unless_disconnected(request, delay):
                st.client_disconnects += 1
                if cfg.bill_on_disconnect:
                    bill()
                return _Silent()

            if fault == "error":
                st.faults["error"] += 1
                if u2 < 0.5:
                    raise ApiFailure(
                        500,
                        "The server had an error while processing your request. Sorry about that!",
                        "server_error",
                    )
                raise ApiFailure(
                    503,
                    "The engine is currently overloaded, please try again later.",
                    "server_error",
                    None,
                    "server_overloaded",
                )
            if fault == "drop":
                st.faults["drop"] += 1
                bill()
                return _Drop()
            if fault == "malformed":
                st.faults["malformed"] += 1
                bill()
                created = int(time.time())
                if u2 < 0.5:
                    body = _json_bytes(
                        {"created": created, "data": [{"b64_json": "iVBORw0KGgoAAAANSUhEUgAA"}]}
                    )
                    body = body[: len(body) // 2]  # truncated JSON
                else:
                    body = _json_bytes({"created": created})  # valid JSON without data
                return Response(body, 200, media_type="application/json")

            payload = await self._build(request, parsed)
            bill()
            st.requests_ok += 1
            st.model(parsed.model)["ok"] += 1
            return Response(_json_bytes(payload), 200, media_type="application/json")
        finally:
            if reserved[0]:
                state.quota.release(reserved[0])

    # ---------------------------------------------------------------- helpers
    def _auth(self, request: Request) -> None:
        key = None
        auth = request.headers.get("authorization")
        if auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                key = token.strip()
        if key is None:
            key = (request.headers.get("api-key") or "").strip() or None
        if key is None:
            raise ApiFailure(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                None,
                "invalid_api_key",
            )
        expected = self.config.api_key
        if expected and not secrets.compare_digest(key.encode(), expected.encode()):
            masked = (
                key[:3] + "*" * max(0, min(20, len(key) - 7)) + key[-4:] if len(key) > 7 else "***"
            )
            raise ApiFailure(
                401,
                f"Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                None,
                "invalid_api_key",
            )

    def _rate_limit_failure(self, model: str, rej: Rejection) -> ApiFailure:
        label = "requests per min (RPM)" if rej.bucket == "requests" else "images per min (IPM)"
        org = self.config.organization
        if rej.wait is None:
            return ApiFailure(
                429,
                f"Request too large for {model} in organization {org} on {label}: Limit {rej.limit}, "
                f"Requested {rej.requested}. Reduce n to run successfully.",
                rej.bucket,
                None,
                "rate_limit_exceeded",
                headers={"x-should-retry": "false"},
            )
        wait_ms = max(1, math.ceil(rej.wait * 1000))
        return ApiFailure(
            429,
            f"Rate limit reached for {model} in organization {org} on {label}: Limit {rej.limit}, "
            f"Used {rej.used}, Requested {rej.requested}. Please try again in {go_duration(wait_ms / 1000)}. "
            "Visit https://platform.openai.com/account/rate-limits to learn more.",
            rej.bucket,
            None,
            "rate_limit_exceeded",
            headers={
                "retry-after": str(max(1, math.ceil(wait_ms / 1000))),
                "retry-after-ms": str(wait_ms),
            },
        )

    @staticmethod
    def _moderation_failure(parsed: Parsed) -> ApiFailure:
        if parsed.spec.is_gpt_image:
            return ApiFailure(
                400,
                "Your request was rejected by the safety system. If you believe this is an error, contact us at "
                "help.openai.com and include the request ID.",
                "image_generation_user_error",
                None,
                "moderation_blocked",
                extra={
                    "moderation_details": {"moderation_stage": "input", "categories": ["simulated"]}
                },
            )
        return ApiFailure(
            400,
            "Your request was rejected as a result of our safety system. Your prompt may contain text that is "
            "not allowed by our safety system.",
            "invalid_request_error",
            None,
            "content_policy_violation",
        )

    async def _build(self, request: Request, parsed: Parsed) -> dict[str, Any]:
        cfg = self.config
        spec = parsed.spec
        fmt = parsed.output_format
        transparent = parsed.background == "transparent"
        key = parsed.render_key
        cache = self.state.cache

        def render_all() -> list[bytes]:
            return [
                render_image(
                    key,
                    i,
                    (parsed.width, parsed.height),
                    fmt,
                    parsed.compression,
                    transparent=transparent,
                    text=cfg.render_text,
                    cache=cache,
                )
                for i in range(parsed.n)
            ]

        images = (
            render_all()
            if parsed.width * parsed.height * parsed.n <= 2_500_000
            else await asyncio.to_thread(render_all)
        )
        created = int(time.time())
        data: list[dict[str, Any]] = []
        revised = (
            _revised_prompt(parsed.prompt, parsed.style)
            if spec.revised_prompt and parsed.op == "generate"
            else None
        )
        base = str(request.base_url).rstrip("/")
        now = time.monotonic()
        for blob in images:
            item: dict[str, Any] = {}
            if parsed.response_format == "url":
                token = self.state.files.put(blob, CONTENT_TYPES[fmt], cfg.url_ttl, now)
                item["url"] = f"{base}/v1/_sim/files/{token}"
            else:
                item["b64_json"] = base64.b64encode(blob).decode("ascii")
            if revised is not None:
                item["revised_prompt"] = revised
            data.append(item)
        body: dict[str, Any] = {"created": created, "data": data}
        if spec.is_gpt_image:
            body["background"] = parsed.background
            body["output_format"] = fmt
            body["size"] = f"{parsed.width}x{parsed.height}"
            if parsed.quality:
                body["quality"] = parsed.quality
        if spec.usage:
            text_tokens = max(1, math.ceil(len(parsed.prompt) / 4)) if parsed.prompt else 0
            image_in = sum(_image_tokens(i.width, i.height) for i in parsed.inputs)
            per_image = OUTPUT_TOKENS.get(parsed.quality or "medium", OUTPUT_TOKENS["medium"])
            out = max(16, round(per_image * parsed.width * parsed.height / 1_048_576)) * parsed.n
            body["usage"] = {
                "total_tokens": text_tokens + image_in + out,
                "input_tokens": text_tokens + image_in,
                "output_tokens": out,
                "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_in},
                "output_tokens_details": {"image_tokens": out, "text_tokens": 0},
            }
        return body

    # ---------------------------------------------------------------- parsing
    async def _parse(self, request: Request, operation: str, default_model: str | None) -> Parsed:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        files: dict[str, list[bytes]] = {}
        if operation == "generate":
            if ctype != "application/json":
                raise _unsupported_ctype(ctype, "'application/json'")
            raw, form, op = await _json_body(request), False, "generate"
        elif operation == "edit" and ctype == "application/json":
            raw, form, op = await _json_body(request), False, "edit_json"
        elif ctype == "multipart/form-data":
            raw, files = await _form_body(request)
            form, op = True, operation
        else:
            accepted = (
                "'multipart/form-data' or 'application/json'"
                if operation == "edit"
                else "'multipart/form-data'"
            )
            raise _unsupported_ctype(ctype, accepted)
        p = _Params(raw, form)

        # model
        model = p.str("model") or default_model or DEFAULT_MODEL[op]
        spec = self.state.registry.get(model)
        if spec is None or (self.config.refuse_retired and spec.is_retired()):
            why = (
                "has been deprecated"
                if spec is not None
                else "does not exist or you do not have access to it"
            )
            raise ApiFailure(
                404, f"The model `{model}` {why}.", "invalid_request_error", None, "model_not_found"
            )
        endpoint = ENDPOINT_OF[op]
        if endpoint not in spec.endpoints:
            raise _bad(
                "model",
                f"The model '{model}' does not support image {LABEL[endpoint]}. "
                f"It serves: {', '.join(spec.endpoints)}.",
            )
        if op == "edit_json" and not spec.is_gpt_image:
            raise _bad(
                "model",
                f"JSON image edits are only supported for GPT image models; send {model} edits as multipart/form-data.",
            )

        # parameter names
        for name in list(raw) + list(files):
            if name in CORE[op] or name in UNIVERSAL:
                continue
            if name in GPT_ONLY and spec.is_gpt_image and op != "variation":
                continue
            if name in OPTIONAL[op] and name in spec.params:
                continue
            raise _unknown(name, model)
        for name in ("image", "image[]", "mask") if form else ():
            if name in raw:
                raise _bad(
                    name,
                    f"Invalid type for '{name}': expected a file, but got a string instead.",
                    "invalid_type",
                )
        if "quality" in raw and not spec.qualities:
            raise _unknown("quality", model)
        if p.bool("stream"):
            raise _bad(
                "stream",
                "Streaming is not implemented by the imagebatch simulator; send stream=false.",
                "unsupported_value",
            )
        partial = p.int("partial_images")
        if partial is not None and not 0 <= partial <= 3:
            raise _bad(
                "partial_images",
                f"Invalid 'partial_images': expected a value between 0 and 3, but got {partial} instead.",
            )
        for name in ("user", "safety_identifier"):
            p.str(name)

        # prompt
        prompt = ""
        if op != "variation":
            value = p.str("prompt")
            if value is None:
                raise _bad(
                    "prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter"
                )
            if not value.strip():
                raise _bad(
                    "prompt",
                    "Invalid 'prompt': empty string. Expected a string with minimum length 1.",
                    "string_below_min_length",
                )
            if len(value) > spec.prompt_max:
                raise _bad(
                    "prompt",
                    f"Invalid 'prompt': string too long. Expected a string with maximum length "
                    f"{spec.prompt_max}, but got a string with length {len(value)} instead.",
                    "string_above_max_length",
                )
            prompt = value

        # n
        n = p.int("n")
        n = 1 if n is None else n
        if n < 1:
            raise _bad(
                "n",
                f"Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} instead.",
                "integer_below_min_value",
            )
        top = min(10, spec.max_n_per_call)
        if n > top:
            raise _bad(
                "n",
                f"Invalid 'n': integer above maximum value. Expected a value <= {top}, but got {n} instead.",
                "integer_above_max_value",
            )

        # quality
        quality = p.enum("quality", spec.qualities) if spec.qualities else None
        if quality is None and spec.qualities:
            quality = (
                spec.default_quality
                if spec.default_quality in spec.qualities
                else spec.qualities[0]
            )
        if quality == "auto":
            quality = "medium"

        # optional parameters (only those the model accepts got this far)
        style = p.enum("style", ENUMS["style"])
        if spec.is_gpt_image:
            response_format = "b64_json"
        else:
            response_format = p.enum("response_format", ENUMS["response_format"]) or "url"
        output_format = p.enum("output_format", ENUMS["output_format"]) or "png"
        compression = p.int("output_compression")
        if compression is not None:
            if not 0 <= compression <= 100:
                raise _bad(
                    "output_compression",
                    f"Invalid 'output_compression': expected a value between 0 and 100, but got {compression} instead.",
                )
            if output_format == "png":
                raise _bad(
                    "output_compression",
                    "The 'output_compression' parameter is only supported for the 'jpeg' and 'webp' output formats.",
                )
        background = p.enum("background", ENUMS["background"]) or "auto"
        if background == "transparent":
            if output_format == "jpeg":
                raise _bad(
                    "background",
                    "Transparent background requires output_format 'png' or 'webp', not 'jpeg'.",
                )
            if not spec.transparent_background:
                raise _bad(
                    "background",
                    f"Transparent background is not supported for {model}.",
                    "unsupported_value",
                )
        background = "transparent" if background == "transparent" else "opaque"
        p.enum("moderation", ENUMS["moderation"])
        p.enum("input_fidelity", ENUMS["input_fidelity"])

        # input images
        inputs: list[InputImage] = []
        mask: InputImage | None = None
        if op in ("edit", "variation"):
            blobs = files.get("image", []) + files.get("image[]", [])
            inputs = [_inspect_image(b, "image") for b in blobs]
            masks = files.get("mask", [])
            if len(masks) > 1:
                raise _bad("mask", "Only one mask may be sent.")
            mask = _inspect_image(masks[0], "mask") if masks else None
        elif op == "edit_json":
            refs = raw.get("images")
            if refs is None:
                raise _bad(
                    "images", "Missing required parameter: 'images'.", "missing_required_parameter"
                )
            if not isinstance(refs, list):
                raise _bad(
                    "images",
                    f"Invalid type for 'images': expected an array, but got {_type_name(refs)} instead.",
                    "invalid_type",
                )
            inputs = [
                _inspect_image(_image_ref(ref, f"images[{i}]"), f"images[{i}]")
                for i, ref in enumerate(refs)
            ]
            if "mask" in raw:
                mask = _inspect_image(_image_ref(raw["mask"], "mask"), "mask")
        if op != "generate":
            self._check_inputs(op, spec, model, inputs, mask)

        # size
        # SPEC: JSON edits default to auto, everything else to the model's default size.
        size = p.str("size")
        if size is None:
            edit_auto = op == "edit_json" and "auto" in spec.allowed_sizes("edit")
            size = "auto" if edit_auto else spec.default_size
        if op == "edit_json" and size not in JSON_EDIT_SIZES:
            raise _bad(
                "size",
                f"Invalid value: '{size}'. Supported values are: {', '.join(repr(s) for s in JSON_EDIT_SIZES)}.",
            )
        size_why = spec.size_error(size, "generate" if op == "generate" else "edit")
        if size_why:
            raise _bad("size", f"Invalid value for 'size': {size_why}.")
        if size == "auto":
            width, height = (
                _edit_auto_size(inputs[0] if inputs else None)
                if op in ("edit", "edit_json")
                else (1024, 1024)
            )
        else:
            w, _, h = size.partition("x")
            width, height = int(w), int(h)

        return Parsed(
            op,
            model,
            spec,
            prompt,
            n,
            width,
            height,
            quality,
            output_format if spec.is_gpt_image else "png",
            compression,
            background,
            response_format,
            style,
            inputs,
        )

    @staticmethod
    def _check_inputs(
        op: str, spec: ModelSpec, model: str, inputs: list[InputImage], mask: InputImage | None
    ) -> None:
        param = "images" if op == "edit_json" else "image"
        if not inputs:
            raise _bad(
                param, f"Missing required parameter: '{param}'.", "missing_required_parameter"
            )
        limit = 1 if op == "variation" else spec.edit_images_max
        if len(inputs) > limit:
            raise _bad(
                param,
                f"Invalid '{param}': {model} accepts at most {limit} input image(s), got {len(inputs)}.",
            )
        square_png = op == "variation" or spec.edit_square_png
        allowed = (
            ("png",)
            if square_png
            else tuple("jpeg" if f == "jpg" else f for f in spec.edit_image_formats)
        )
        for img in inputs:
            if len(img.data) > spec.edit_image_max_bytes:
                raise _bad(
                    param,
                    f"Invalid '{param}': image is {len(img.data):,} bytes; {model} accepts at most "
                    f"{spec.edit_image_max_bytes:,} bytes per image.",
                    "image_too_large",
                )
            if img.format not in allowed:
                raise _bad(
                    param,
                    f"Invalid image format '{img.format}' for '{param}'. Supported formats: {', '.join(allowed)}.",
                    "invalid_image_format",
                )
            if square_png and img.width != img.height:
                raise _bad(
                    param,
                    f"Invalid '{param}': {model} needs a square PNG, got {img.width}x{img.height}.",
                    "invalid_image",
                )
        if mask is not None:
            if len(mask.data) > spec.mask_max_bytes:
                raise _bad(
                    "mask",
                    f"Invalid 'mask': {len(mask.data):,} bytes; at most {spec.mask_max_bytes:,}.",
                    "image_too_large",
                )
            if mask.format != "png":
                raise _bad(
                    "mask",
                    f"Invalid 'mask': must be a PNG, got '{mask.format}'.",
                    "invalid_image_format",
                )
            if not mask.has_alpha:
                raise _bad(
                    "mask",
                    "Invalid 'mask': the mask PNG must have an alpha channel.",
                    "invalid_image",
                )
            first = inputs[0]
            if (mask.width, mask.height) != (first.width, first.height):
                raise _bad(
                    "mask",
                    f"Invalid 'mask': mask is {mask.width}x{mask.height} but the image is "
                    f"{first.width}x{first.height}; they must have the same dimensions.",
                    "invalid_image",
                )

    # ---------------------------------------------------------------- other endpoints
    async def file(self, request: Request) -> Response:
        token = request.path_params["token"]
        now = time.monotonic()
        found = self.state.files.get(token, now)
        headers = {"x-request-id": "req_" + secrets.token_hex(16)}
        if found is None:
            failure = ApiFailure(
                404,
                "No such file (unknown or long-expired URL).",
                "invalid_request_error",
                None,
                "not_found",
            )
            return Response(
                _json_bytes(failure.body()), 404, media_type="application/json", headers=headers
            )
        if found == "expired":
            failure = ApiFailure(
                410, "This URL has expired.", "invalid_request_error", None, "url_expired"
            )
            return Response(
                _json_bytes(failure.body()), 410, media_type="application/json", headers=headers
            )
        assert isinstance(found, tuple)
        data, ctype = found
        self.state.stats.files_served += 1
        return Response(data, 200, media_type=ctype, headers=headers)

    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ApiFailure as exc:
            return Response(_json_bytes(exc.body()), exc.status, media_type="application/json")
        name = request.path_params.get("model")
        reg = self.state.registry

        def entry(m: str) -> dict[str, Any]:
            return {"id": m, "object": "model", "created": 0, "owned_by": "imagebatch-simulator"}

        if name is None:
            return Response(
                _json_bytes({"object": "list", "data": [entry(m) for m in reg.names()]}),
                media_type="application/json",
            )
        if reg.get(name) is None:
            failure = ApiFailure(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
            return Response(_json_bytes(failure.body()), 404, media_type="application/json")
        return Response(_json_bytes(entry(name)), media_type="application/json")

    async def stats(self, request: Request) -> Response:
        return Response(_json_bytes(self.state.stats.snapshot()), media_type="application/json")

    async def reset(self, request: Request) -> Response:
        self.state.reset()
        return Response(_json_bytes({"ok": True}), media_type="application/json")

    async def config_endpoint(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                data = json.loads(await request.body() or b"{}")
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object of settings")
                self.config.update(data)
                self.state.sync()
            except ValueError as exc:
                failure = _bad(None, f"Invalid simulator config: {exc}")
                return Response(_json_bytes(failure.body()), 400, media_type="application/json")
        return Response(_json_bytes(self.config.to_dict()), media_type="application/json")

    async def health(self, request: Request) -> Response:
        return Response(_json_bytes({"ok": True}), media_type="application/json")


# --------------------------------------------------------------------------- request bodies
def _unsupported_ctype(ctype: str, accepted: str) -> ApiFailure:
    shown = ctype or "(none)"
    return _bad(
        None,
        f"Unsupported content type: '{shown}'. This API method only accepts {accepted} requests, "
        f"but you specified the header 'Content-Type: {shown}'. Please try again with a supported content type.",
        "unsupported_content_type",
    )


async def _json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise _bad(
            None,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
            "valid JSON.)",
            None,
        )
    return {k: v for k, v in data.items() if v is not None}


async def _form_body(request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    try:
        form = await request.form(max_files=64, max_fields=256, max_part_size=4 * 1024 * 1024)
    except Exception as exc:  # malformed multipart
        detail = getattr(exc, "detail", None) or str(exc)
        raise _bad(None, f"Could not parse the multipart/form-data body: {detail}", None) from None
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in ("image", "image[]", "mask"):
                    raise _bad(name, f"Unexpected file upload in field '{name}'.", "invalid_type")
                files.setdefault(name, []).append(await value.read())
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields, files


def _image_ref(ref: Any, param: str) -> bytes:
    if not isinstance(ref, dict):
        raise _bad(
            param,
            f"Invalid type for '{param}': expected an object, but got {_type_name(ref)} instead.",
            "invalid_type",
        )
    extra = set(ref) - {"image_url", "file_id"}
    if extra:
        raise _bad(
            f"{param}.{sorted(extra)[0]}",
            f"Unknown parameter: '{param}.{sorted(extra)[0]}'.",
            "unknown_parameter",
        )
    given = [k for k in ("image_url", "file_id") if ref.get(k) is not None]
    if len(given) != 1:
        raise _bad(param, f"Invalid '{param}': give exactly one of 'image_url' or 'file_id'.")
    if given[0] == "file_id":
        raise _bad(
            f"{param}.file_id",
            "The simulator has no Files API; send the image as an image_url data URL.",
        )
    return _decode_data_url(ref["image_url"], f"{param}.image_url")


async def _sleep_unless_disconnected(request: Request, seconds: float) -> bool:
    """Sleep; return False early if the client disconnects first. The body must already be read."""
    receive = request.receive

    async def disconnected() -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                return

    sleeper = asyncio.ensure_future(asyncio.sleep(seconds))
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({sleeper, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, watcher):
            if not task.done():
                task.cancel()
    return not watcher.done() or watcher.cancelled()


# --------------------------------------------------------------------------- factory
async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    if status == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif status == 405:
        message = f"Method not allowed ({request.method} {request.url.path})"
    else:
        message = str(getattr(exc, "detail", "") or exc)
    failure = ApiFailure(status, message, "invalid_request_error")
    return Response(
        _json_bytes(failure.body()),
        status,
        media_type="application/json",
        headers={"x-request-id": "req_" + secrets.token_hex(16)},
    )


def create_app(config: SimConfig | None = None, registry: Registry | None = None) -> Starlette:
    """The simulator as an ASGI app. `app.state.simulator.state` holds stats, limits and the config."""
    config = config if config is not None else SimConfig()
    sim = Simulator(config, registry if registry is not None else Registry.load())
    routes = [
        Route("/v1/images/generations", sim.generations, methods=["POST"]),
        Route("/v1/images/edits", sim.edits, methods=["POST"]),
        Route("/v1/images/variations", sim.variations, methods=["POST"]),
        # Azure OpenAI shapes: /openai/deployments/{deployment}/images/... and /openai/v1/images/...
        Route("/openai/deployments/{deployment}/images/{op:str}", sim.azure, methods=["POST"]),
        Route("/openai/v1/images/{op:str}", sim.azure, methods=["POST"]),
        Route("/v1/models", sim.models, methods=["GET"]),
        Route("/v1/models/{model:path}", sim.models, methods=["GET"]),
        Route("/v1/_sim/files/{token}", sim.file, methods=["GET"]),
        Route("/v1/_sim/stats", sim.stats, methods=["GET"]),
        Route("/v1/_sim/reset", sim.reset, methods=["POST"]),
        Route("/v1/_sim/config", sim.config_endpoint, methods=["GET", "POST"]),
        Route("/v1/_sim/health", sim.health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.simulator = sim
    return app
