"""Error classification: what came back from an Images API call becomes one ApiError class.

The class says what the pipeline does about it (retry, pause, fail the row, stop the run);
the full table, and how `x-should-retry` adjusts it, is in docs/design.md ("Error
classification"). Messages carry only what the server said; keys are masked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import httpx

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
from imagebatch.tasks.headers import lower_headers, parse_duration, parse_reset, parse_retry_after
from imagebatch.tasks.redact import scrub

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

_TRY_AGAIN = re.compile(
    r"try again in\s+((?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|us|µs|μs|ns|h|m|s))+)", re.I
)
# Azure and others: "Please retry after 6 seconds."
_RETRY_AFTER_WORDS = re.compile(
    r"(?:try again|retry) (?:in|after)\s+(\d+(?:\.\d+)?)\s*(milliseconds?|ms|seconds?|secs?|s)\b",
    re.I,
)
RESET_BUCKETS = ("requests", "tokens", "images", "input-images")
_KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")


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


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Mask anything shaped like an OpenAI key, then each of `secrets` (the run's key in any
    shape, a password in the base URL) by value: every error is built through here."""
    return scrub(_KEY_LIKE.sub("sk-***", text), secrets)


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


def error_from_response(
    status: int,
    headers: Mapping[str, str] | None,
    body: bytes,
    secrets: tuple[str, ...] = (),
) -> ApiError:
    """The ApiError for a non-2xx response (see the module docstring for the table); every
    text the server sent has `secrets` masked."""
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
        redact(_truncate(message), secrets),
        status=status,
        code=scrub(code, secrets),
        type=scrub(etype, secrets),
        param=scrub(param, secrets),
        request_id=scrub(h.get("x-request-id"), secrets),
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


def error_from_transport(exc: BaseException, secrets: tuple[str, ...] = ()) -> ApiError:
    """The ApiError for an exception raised while sending a request or reading its answer.

    Not sent (connect, pool, proxy, incomplete body write) is transient; sent and then lost
    (read timeout, dropped connection) is ambiguous because the server may have billed it.
    Anything unrecognised is a RequestError: not retried, so a bug cannot loop.
    """
    if isinstance(exc, ApiError):
        return exc
    detail = redact(_truncate(str(exc), 200), secrets) or type(exc).__name__
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
