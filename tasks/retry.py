"""Error classification and the retry policy for Images API calls.

Classification turns what came back (a status with headers and body, a transport exception,
or a 200 that cannot be used) into one of the `tasks.errors.ApiError` classes; the class says
what the pipeline does about it:

    status / failure                                  class            retried
    400, 422 moderation_blocked, content_policy_violation,
             contentFilter / content_filter,
             inner_error.code ResponsibleAIPolicyViolation, or (a proxy rewrote the
             code, e.g. LiteLLM's "400") a safety-system message
                                                      RejectedError    never
    408, 409, 5xx                                     TransientError   yes
    insufficient_quota, billing_hard_limit_reached (code or type, any status)
                                                      FatalError       never, stops the run
    429 "Request too large" (one request over a per-minute limit)
                                                      RequestError     never (it cannot fit)
    429 rate limit (rate_limit_exceeded, a bucket type, "rate limit" / "try again in",
        or a bare 429 with nothing said)              RateLimited      yes (and the caller pauses the limiter)
    429 anything else (e.g. "engine overloaded")      TransientError   yes, this request only
    401, 403                                          FatalError       never, stops the run
    404 model_not_found / DeploymentNotFound (or a "model ... does not exist" message),
        any 4xx with those codes                      ModelUnavailable never; that model's rows fail
    other 404 (a wrong base URL: every request would hit it)
                                                      FatalError       never, stops the run
    other 4xx, unexpected statuses                    RequestError     never
    connect error/timeout, pool timeout, proxy error,
    write error/timeout (the body never fully left)   TransientError   yes
    read timeout/error, remote protocol error, close error
    (sent, then the answer was lost)                  AmbiguousError   only if on_ambiguous == "retry"
    200 with bad JSON or no image                     TransientError   yes (like a 5xx)

Error bodies that are not OpenAI-shaped (FastAPI's `{"detail": [...]}`, `{"message": ...}`,
HTML from a gateway) are summarised in one line, leaving out echoed request values such as
the prompt.

`x-should-retry` (a non-standard header the official SDK obeys) is recorded on the error as
`should_retry` and adjusts the class:

- `true` turns a would-be RequestError into a TransientError. It never overrides RejectedError
  or FatalError: moderation and quota refusals are not worth repeating whatever the header says,
  and bad credentials do not heal.
- `false` turns a 408/409/5xx TransientError into a RequestError (failed, not retried). A 429
  stays RateLimited so that the caller still pauses the run, but with `should_retry=False` the
  policy below does not retry that request.

Messages carry only what the server put in the response body (or a description of the transport
failure). Request headers, and so the API key, are never read here; anything that looks like an
OpenAI key in a message is masked anyway.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import tenacity

from imagebatch.configs.settings import RetrySettings
from imagebatch.tasks.errors import (
    AmbiguousError,
    ApiError,
    FatalError,
    ModelUnavailable,
    RateLimited,
    RejectedError,
    RequestError,
    TransientError,
)

MESSAGE_LIMIT = 500
REJECTION_CODES = frozenset(
    {"moderation_blocked", "content_policy_violation", "contentfilter", "content_filter"}
)
REJECTION_INNER_CODES = frozenset({"responsibleaipolicyviolation"})
FATAL_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
MODEL_CODES = frozenset({"model_not_found", "deploymentnotfound", "deployment_not_found"})
# Codes a proxy leaves when it rewrites the original one; the message then says what it was.
GENERIC_CODES = frozenset({"", "none", "null", "bad_request", "badrequest", "badrequesterror"})
RATE_CODES = frozenset({"rate_limit_exceeded", "ratelimitexceeded", "too_many_requests"})
RATE_TYPES = frozenset({"requests", "tokens", "images", "input-images", "rate_limit_exceeded"})
_SAFETY = re.compile(
    r"safety system|content[ _-]?polic|moderation_blocked|content_filter|contentfilter"
    r"|responsibleaipolicyviolation|content management policy",
    re.I,
)
_TOO_LARGE = re.compile(r"request too large|too large for", re.I)
_RATE_TEXT = re.compile(r"rate limit|too many requests|try again in|per min", re.I)
_MODEL_MISSING = re.compile(
    r"model.{0,120}(does not exist|not found|not exist|has been deprecated|is not available)"
    r"|deployment.{0,120}(does not exist|not found)",
    re.I | re.S,
)
_TAGS = re.compile(r"<[^>]*>")
SUMMARY_LIMIT = 300
EMPTY_BODIES = ("empty response body", "empty error body")
# Keys in a validation-error item that echo the request back (the whole prompt, say).
_ECHO_KEYS = frozenset({"input", "ctx", "url", "body"})

_UNITS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ns": 1e-9,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|μs|ns|h|m|s)")
_TRY_AGAIN = re.compile(
    r"try again in\s+((?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|us|µs|μs|ns|h|m|s))+)", re.I
)
# Azure and others: "Please retry after 6 seconds."
_RETRY_AFTER_WORDS = re.compile(
    r"(?:try again|retry) (?:in|after)\s+(\d+(?:\.\d+)?)\s*(milliseconds?|ms|seconds?|secs?|s)\b",
    re.I,
)
# A reset "duration" this large is an absolute Unix time (some compatible servers send one).
_EPOCH_SECONDS = 1e9
_EPOCH_MILLIS = 1e12
RESET_BUCKETS = ("requests", "tokens", "images", "input-images")
_KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")


# ---------------------------------------------------------------------------------------------
# Durations and headers


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration (`1s`, `6m0s`, `240ms`, `1h2m3.5s`); a plain number is seconds.

    Returns None for anything else, including negative, infinite or empty values.
    """
    if text is None:
        return None
    s = str(text).strip()
    if not s:
        return None
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    total = 0.0
    pos = 0
    for match in _DURATION_PART.finditer(s):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(s) or pos == 0:
        return None
    return total


def parse_reset(text: str | None, now: float | None = None) -> float | None:
    """Seconds until an `x-ratelimit-reset-*` value: a Go duration (`6m0s`), plain seconds, or
    an absolute Unix time in seconds or milliseconds (no real duration is 30 years long)."""
    if text is None:
        return None
    seconds = parse_duration(text)
    if seconds is None:
        return None
    if seconds >= _EPOCH_SECONDS:
        wall = time.time() if now is None else now
        absolute = seconds / 1000.0 if seconds >= _EPOCH_MILLIS else seconds
        return max(0.0, absolute - wall)
    return seconds


def _reset_hint(headers: Mapping[str, str]) -> float | None:
    """The longest reset among exhausted buckets (or all, when none says it is exhausted)."""
    waits = []
    for bucket in RESET_BUCKETS:
        reset = parse_reset(headers.get(f"x-ratelimit-reset-{bucket}"))
        if reset is None:
            continue
        remaining = headers.get(f"x-ratelimit-remaining-{bucket}")
        if remaining is None or remaining.strip() in ("0", "0.0"):
            waits.append(reset)
    return max(waits) if waits else None


def lower_headers(headers: Mapping[str, str] | None) -> Mapping[str, str]:
    """A mapping whose lookups by lower-case name work (httpx.Headers is returned as it is)."""
    if not headers:
        return {}
    if isinstance(headers, httpx.Headers):
        return headers
    return {str(k).lower(): v for k, v in headers.items()}


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """The server's wait hint in seconds, read the way the official SDK reads it.

    `retry-after-ms` (float milliseconds) first, then `retry-after` as seconds, then `retry-after`
    as an HTTP-date measured from `now` (epoch seconds, default the wall clock; a date in the past
    gives 0). Malformed, negative or infinite values count as absent.
    """
    h = lower_headers(headers)
    raw_ms = h.get("retry-after-ms")
    if raw_ms is not None:
        try:
            ms = float(raw_ms)
        except ValueError:
            pass
        else:
            if math.isfinite(ms) and ms >= 0:
                return ms / 1000.0
    raw = h.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _should_retry_header(headers: Mapping[str, str]) -> bool | None:
    value = headers.get("x-should-retry")
    if value is None:
        return None
    value = value.strip().lower()
    if value == "true":
        return True
    if value == "false":
        return False
    return None


def redact(text: str) -> str:
    """Mask anything shaped like an OpenAI key."""
    return _KEY_LIKE.sub("sk-***", text)


def _truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Classification


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _parse_body(body: bytes | str | None) -> tuple[str, dict[str, Any] | None, str | None]:
    """(message, error object or None, inner error code or None) from an error body."""
    if body is None:
        body = b""
    text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else str(body)
    try:
        data = json.loads(text) if text.strip() else None
    except ValueError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        inner = err.get("inner_error") or err.get("innererror")
        inner_code = _text(inner.get("code")) if isinstance(inner, dict) else None
        message = _text(err.get("message")) or _summary(err) or "no message"
        return message, err, inner_code
    if isinstance(err, str) and err.strip():
        return err, None, None
    if data is not None:
        return _summary(data) or "empty error body", None, None
    if not text.strip():
        return "empty response body", None, None
    return _truncate(" ".join(_TAGS.sub(" ", text).split()), SUMMARY_LIMIT), None, None


def _summary(data: Any) -> str:
    """One readable line for an error body of another shape, without echoed request values."""
    if isinstance(data, dict):
        for key in ("detail", "message", "msg", "errors", "error_description", "title"):
            value = data.get(key)
            if value:
                return _truncate(_summary(value), SUMMARY_LIMIT)
        data = {k: v for k, v in data.items() if k not in _ECHO_KEYS}
        return _truncate(json.dumps(data, ensure_ascii=False, default=str), SUMMARY_LIMIT)
    if isinstance(data, list):
        parts = [_validation_item(item) for item in data[:3]]
        more = f" (+{len(data) - 3} more)" if len(data) > 3 else ""
        return _truncate("; ".join(p for p in parts if p) + more, SUMMARY_LIMIT)
    return _truncate(str(data), SUMMARY_LIMIT)


def _validation_item(item: Any) -> str:
    """FastAPI/pydantic `{"loc": [...], "msg": ..., "input": ...}` as `body.n: msg`."""
    if not isinstance(item, dict):
        return _truncate(str(item), 120)
    msg = item.get("msg") or item.get("message")
    if msg is None:
        kept = {k: v for k, v in item.items() if k not in _ECHO_KEYS}
        return _truncate(json.dumps(kept, ensure_ascii=False, default=str), 120)
    loc = item.get("loc")
    where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
    return _truncate(f"{where}: {msg}" if where else str(msg), 120)


def _message_hint(message: str) -> float | None:
    """The wait a 429's message asks for ("try again in 1m30s", "retry after 6 seconds")."""
    found = _TRY_AGAIN.search(message)
    if found:
        return parse_duration(found.group(1))
    words = _RETRY_AFTER_WORDS.search(message)
    if words:
        unit = words.group(2).lower()
        return float(words.group(1)) / (1000.0 if unit.startswith("m") else 1.0)
    return None


def _classify(
    status: int, code: str | None, etype: str | None, message: str, inner_code: str | None
) -> type[ApiError]:
    """The error class for a non-2xx answer (the table in the module docstring)."""
    code_l = (code or "").lower()
    type_l = (etype or "").lower()
    generic = code is None or code_l in GENERIC_CODES or code_l.isdigit()
    refused = (
        code_l in REJECTION_CODES
        or (inner_code or "").lower() in REJECTION_INNER_CODES
        or (generic and bool(_SAFETY.search(message)))
    )
    if code_l in FATAL_CODES or type_l in FATAL_CODES:
        return FatalError
    if status in (400, 422) and refused:
        return RejectedError
    if 400 <= status < 500 and code_l in MODEL_CODES:
        return ModelUnavailable
    if status == 429:
        if _TOO_LARGE.search(message):
            return RequestError
        if (
            code_l in RATE_CODES
            or type_l in RATE_TYPES
            or (generic and (_RATE_TEXT.search(message) or message in EMPTY_BODIES))
        ):
            return RateLimited
        return TransientError
    if status == 404:
        return ModelUnavailable if generic and _MODEL_MISSING.search(message) else FatalError
    if status in (401, 403):
        return FatalError
    if status in (408, 409) or 500 <= status <= 599:
        return TransientError
    return RequestError


def error_from_response(status: int, headers: Mapping[str, str] | None, body: bytes) -> ApiError:
    """The ApiError for a non-2xx response (see the module docstring for the table)."""
    h = lower_headers(headers)
    message, err, inner_code = _parse_body(body)
    err = err or {}
    code = _text(err.get("code"))
    etype = _text(err.get("type"))
    param = _text(err.get("param"))
    should_retry = _should_retry_header(h)
    retry_after = parse_retry_after(h)

    cls = _classify(status, code, etype, message, inner_code)

    if should_retry is True and cls is RequestError:
        cls = TransientError
    elif should_retry is False and cls is TransientError:
        cls = RequestError

    if cls is RateLimited and retry_after is None:
        retry_after = _message_hint(message)
        if retry_after is None:
            retry_after = _reset_hint(h)

    return cls(
        redact(_truncate(message)),
        status=status,
        code=code,
        type=etype,
        param=param,
        request_id=h.get("x-request-id"),
        retry_after=retry_after,
        should_retry=should_retry,
    )


# (exception class, error class, code, what happened); the first match wins, so subclasses first.
_TRANSPORT: tuple[tuple[type[BaseException], type[ApiError], str, str], ...] = (
    (
        httpx.ConnectTimeout,
        TransientError,
        "connect_timeout",
        "connect timeout (the request was not sent)",
    ),
    (
        httpx.ConnectError,
        TransientError,
        "connect_error",
        "could not connect (the request was not sent)",
    ),
    (
        httpx.PoolTimeout,
        TransientError,
        "pool_timeout",
        "no free connection in time (the request was not sent)",
    ),
    (httpx.ProxyError, TransientError, "proxy_error", "proxy error (the request was not sent)"),
    (
        httpx.WriteTimeout,
        TransientError,
        "write_timeout",
        "write timeout while sending the request body",
    ),
    (
        httpx.WriteError,
        TransientError,
        "write_error",
        "connection failed while sending the request body",
    ),
    (httpx.ReadTimeout, AmbiguousError, "read_timeout", "read timeout after the request was sent"),
    (httpx.ReadError, AmbiguousError, "read_error", "connection lost after the request was sent"),
    (
        httpx.RemoteProtocolError,
        AmbiguousError,
        "remote_protocol_error",
        "the server broke the connection or protocol after the request was sent",
    ),
    (httpx.CloseError, AmbiguousError, "close_error", "connection failed while closing"),
    (
        httpx.UnsupportedProtocol,
        FatalError,
        "unsupported_protocol",
        "the base URL has an unsupported scheme",
    ),
    (
        httpx.LocalProtocolError,
        RequestError,
        "local_protocol_error",
        "the request could not be encoded",
    ),
    (httpx.TooManyRedirects, RequestError, "too_many_redirects", "too many redirects"),
    (
        httpx.DecodingError,
        TransientError,
        "decoding_error",
        "the response body could not be decoded",
    ),
    (
        httpx.TimeoutException,
        AmbiguousError,
        "timeout",
        "timed out, possibly after the request was sent",
    ),
    (
        httpx.TransportError,
        AmbiguousError,
        "transport_error",
        "transport failure, possibly after the request was sent",
    ),
    (TimeoutError, AmbiguousError, "timeout", "timed out, possibly after the request was sent"),
    (OSError, AmbiguousError, "os_error", "network failure, possibly after the request was sent"),
)


def error_from_transport(exc: BaseException) -> ApiError:
    """The ApiError for an exception raised while sending a request or reading its answer.

    Not sent (connect, pool, proxy, incomplete body write) is transient; sent and then lost
    (read timeout, dropped connection) is ambiguous because the server may have billed it.
    Anything unrecognised is a RequestError: not retried, so a bug cannot loop.
    """
    if isinstance(exc, ApiError):
        return exc
    detail = redact(_truncate(str(exc), 200)) or type(exc).__name__
    for exc_cls, cls, code, what in _TRANSPORT:
        if isinstance(exc, exc_cls):
            return cls(f"{what}: {detail}", code=code)
    return RequestError(
        f"unexpected client error {type(exc).__name__}: {detail}", code="client_error"
    )


def malformed_response_error(
    reason: str, status: int = 200, request_id: str | None = None
) -> TransientError:
    """A 2xx whose body cannot be used (bad JSON, no image data): retried like a 5xx."""
    return TransientError(
        f"malformed response: {redact(_truncate(reason))}",
        status=status,
        code="malformed_response",
        request_id=request_id,
    )


# ---------------------------------------------------------------------------------------------
# Policy


def is_retryable(error: BaseException, settings: RetrySettings) -> bool:
    """Whether the policy may retry after `error` at all (ignoring attempt and time budgets)."""
    if not isinstance(error, TransientError):
        return False
    if isinstance(error, AmbiguousError) and settings.on_ambiguous != "retry":
        return False
    if error.should_retry is False:
        return False
    hint = error.retry_after
    if hint is not None and math.isfinite(hint) and hint > settings.max_server_hint:
        return False
    return True


def retry_wait(
    error: BaseException,
    retries_so_far: int,
    settings: RetrySettings,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """Seconds to wait before the next attempt, or None when `error` must not be retried.

    A server hint with 0 < hint <= max_server_hint is waited exactly (no jitter); a longer hint
    means give up. Without a usable hint: full jitter, rand() * min(backoff_max,
    backoff_initial * 2**retries_so_far).
    """
    if not is_retryable(error, settings):
        return None
    hint = getattr(error, "retry_after", None)
    if hint is not None and 0 < hint <= settings.max_server_hint:
        return float(hint)
    ceiling = min(
        settings.backoff_max, settings.backoff_initial * 2.0 ** min(max(retries_so_far, 0), 64)
    )
    return rand() * ceiling


_WAIT_ATTR = "_imagebatch_wait"
_LIMITED_ATTR = "_imagebatch_rate_limited"
_LIMITED_SEEN_ATTR = "_imagebatch_rate_limited_seen"


def retrying(
    settings: RetrySettings,
    *,
    on_retry: Callable[[ApiError, int, float], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> tenacity.AsyncRetrying:
    """A tenacity policy for one request: `async for attempt in retrying(s): with attempt: ...`.

    Retries what `is_retryable` allows, waits `retry_wait`, stops after `max_attempts` attempts
    (429 rate-limit answers do not count) or
    before a sleep that would end past `max_total_seconds` from the first attempt, and re-raises
    the last ApiError (never tenacity.RetryError). `on_retry(error, attempt_number, wait)` runs
    before each sleep, where attempt_number is the attempt that just failed (1 for the first).
    """

    def wait_for(state: tenacity.RetryCallState) -> float:
        # Computed once per attempt: tenacity 9 asks `wait` before `stop`, 8.x the other way round.
        cached = getattr(state, _WAIT_ATTR, None)
        if cached is not None and cached[0] == state.attempt_number:
            return cached[1]
        error = state.outcome.exception() if state.outcome is not None else None
        value = (
            retry_wait(error, state.attempt_number - 1, settings, rand)
            if error is not None
            else None
        )
        value = 0.0 if value is None else value
        setattr(state, _WAIT_ATTR, (state.attempt_number, value))
        return value

    def should_retry(state: tenacity.RetryCallState) -> bool:
        if state.outcome is None or not state.outcome.failed:
            return False
        error = state.outcome.exception()
        return error is not None and is_retryable(error, settings)

    def should_stop(state: tenacity.RetryCallState) -> bool:
        # A 429 rate_limit_exceeded is the limiter's business and costs nothing, so it does not
        # use up an attempt; the time budget still bounds it.
        limited = getattr(state, _LIMITED_ATTR, 0)
        if state.outcome is not None and isinstance(state.outcome.exception(), RateLimited):
            if getattr(state, _LIMITED_SEEN_ATTR, None) != state.attempt_number:
                limited += 1
                setattr(state, _LIMITED_ATTR, limited)
                setattr(state, _LIMITED_SEEN_ATTR, state.attempt_number)
        if state.attempt_number - limited >= settings.max_attempts:
            return True
        elapsed = max(time.monotonic() - state.start_time, state.idle_for)
        return elapsed + wait_for(state) > settings.max_total_seconds

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is None or state.outcome is None:
            return
        error = state.outcome.exception()
        if not isinstance(error, ApiError):
            return
        seconds = state.next_action.sleep if state.next_action is not None else wait_for(state)
        on_retry(error, state.attempt_number, seconds)

    return tenacity.AsyncRetrying(
        sleep=sleep,
        retry=should_retry,
        wait=wait_for,
        stop=should_stop,
        before_sleep=before_sleep,
        reraise=True,
    )
