"""Reading rate-limit and retry headers: Go-style durations, resets, `retry-after`; and the
limit a 429's message states.

Used by the limiter (to learn limits) and by error classification (to read wait hints).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

import httpx

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
# A reset "duration" this large is an absolute Unix time (some compatible servers send one).
_EPOCH_SECONDS = 1e9
_EPOCH_MILLIS = 1e12


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


# "Rate limit reached for gpt-image-2 in organization org-x on images per min (IPM): Limit 5,
# Used 5, Requested 1. ..." (also "requests per min (RPM)", and "Request too large ... Limit").
_MESSAGE_LIMIT = re.compile(
    r"\bon (requests|images|input-images|tokens) per min(?:ute)?\b[^:]{0,16}: Limit (\d{1,9})\b",
    re.IGNORECASE,
)


def limit_in_message(message: str | None) -> tuple[str, float] | None:
    """The per-minute limit an OpenAI 429 message states, as ("requests" | "images", limit).

    The fallback when a server sends no `x-ratelimit-limit-*` headers. Buckets the limiter
    does not pace (tokens, input images of edits) give None, as does any other wording.
    """
    match = _MESSAGE_LIMIT.search((message or "")[:2000])
    if match is None or match.group(1).lower() not in ("requests", "images"):
        return None
    limit = float(match.group(2))
    return (match.group(1).lower(), limit) if limit > 0 else None
