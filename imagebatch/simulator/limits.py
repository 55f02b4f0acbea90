"""Exact sliding-window rate limits (requests and images per window) and the image quota.

The window length is read at every call, so changing `window_seconds` at runtime works.
All methods take `now` (time.monotonic() by default) so tests can drive time by hand.
Single-threaded use (the event loop) is assumed.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass


class SlidingWindow:
    """Units admitted in the last `window` seconds, counted exactly (one entry per admission)."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, int]] = deque()
        self._used = 0

    def _expire(self, now: float, window: float) -> None:
        cutoff = now - window
        events = self._events
        while events and events[0][0] <= cutoff:
            self._used -= events.popleft()[1]

    def used(self, now: float, window: float) -> int:
        self._expire(now, window)
        return self._used

    def wait_for(self, amount: int, limit: int, now: float, window: float) -> float | None:
        """Seconds until `amount` more units fit under `limit`: 0.0 if they fit now,
        None if they never can (amount > limit)."""
        self._expire(now, window)
        if self._used + amount <= limit:
            return 0.0
        if amount > limit:
            return None
        excess = self._used + amount - limit
        freed = 0
        for ts, units in self._events:
            freed += units
            if freed >= excess:
                return max(0.0, ts + window - now)
        return window  # unreachable when amount <= limit

    def add(self, amount: int, now: float) -> None:
        if amount > 0:
            self._events.append((now, amount))
            self._used += amount

    def next_release(self, now: float, window: float) -> float:
        """Seconds until the oldest admitted unit leaves the window (0 when empty)."""
        self._expire(now, window)
        if not self._events:
            return 0.0
        return max(0.0, self._events[0][0] + window - now)

    def clear(self) -> None:
        self._events.clear()
        self._used = 0


@dataclass
class Rejection:
    bucket: str  # "requests" or "images"
    limit: int
    used: int
    requested: int
    wait: float | None  # seconds until it would fit; None = never (requested > limit)
    window: float = 60.0  # seconds the limit counts over


class RateLimits:
    """RPM and IPM over one sliding window; a request is admitted only if both fit."""

    def __init__(self) -> None:
        self.requests = SlidingWindow()
        self.images = SlidingWindow()

    def admit(
        self, images: int, rpm: int, ipm: int, window: float, now: float | None = None
    ) -> Rejection | None:
        """Count the request (1 request, `images` images) or say why not. A rejected request counts nothing."""
        now = time.monotonic() if now is None else now
        if rpm > 0:
            wait = self.requests.wait_for(1, rpm, now, window)
            if wait != 0.0:
                return Rejection("requests", rpm, self.requests.used(now, window), 1, wait, window)
        if ipm > 0:
            wait = self.images.wait_for(images, ipm, now, window)
            if wait != 0.0:
                return Rejection("images", ipm, self.images.used(now, window), images, wait, window)
        # Traffic is counted even while no limit is set (so a limit set at runtime sees the last
        # window); expire as we go so the deques stay bounded by one window of traffic.
        self.requests.used(now, window)
        self.images.used(now, window)
        self.requests.add(1, now)
        self.images.add(images, now)
        return None

    def headers(
        self, rpm: int, ipm: int, window: float, now: float | None = None, unix: bool = False
    ) -> dict[str, str]:
        """x-ratelimit-* headers for the limits that are set; `unix`: resets as absolute Unix
        times (as some compatible servers send them) instead of Go durations."""
        now = time.monotonic() if now is None else now
        out: dict[str, str] = {}
        for limit, win, suffix in ((rpm, self.requests, "requests"), (ipm, self.images, "images")):
            if limit > 0:
                used = win.used(now, window)
                out[f"x-ratelimit-limit-{suffix}"] = str(limit)
                out[f"x-ratelimit-remaining-{suffix}"] = str(max(0, limit - used))
                wait = win.next_release(now, window)
                out[f"x-ratelimit-reset-{suffix}"] = (
                    str(math.ceil(time.time() + wait)) if unix else go_duration(wait)
                )
        return out

    def clear(self) -> None:
        self.requests.clear()
        self.images.clear()


class Quota:
    """Images that may still be billed. Reserved at admission, billed or released at the end."""

    def __init__(self) -> None:
        self.billed = 0
        self.reserved = 0

    def try_reserve(self, n: int, limit: int) -> bool:
        if limit > 0 and self.billed + self.reserved + n > limit:
            return False
        self.reserved += n
        return True

    def bill(self, n: int) -> None:
        self.reserved = max(0, self.reserved - n)
        self.billed += n

    def release(self, n: int) -> None:
        self.reserved = max(0, self.reserved - n)

    def clear(self) -> None:
        self.billed = 0
        self.reserved = 0


def go_duration(seconds: float) -> str:
    """Go's time.Duration.String() at millisecond precision: 0s, 240ms, 1s, 1.5s, 6m0s, 1h2m3s."""
    ms = int(math.ceil(seconds * 1000 - 1e-6)) if seconds > 0 else 0
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, frac = divmod(rem, 1000)
    sec = f"{s}" if frac == 0 else f"{s}.{frac:03d}".rstrip("0")
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"
