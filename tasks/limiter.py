"""One rate limiter per run, shared by every request (asyncio, one event loop).

    limiter = Limiter.from_settings(resolve_limits(settings))
    body = limiter.expected_body(model, size, n_images, output_format, output_compression)
    async with limiter.slot(n_images, body) as permit:
        response = await send(...)
        permit.record(response.headers, latency, [len(image) for image in images])
        ... store the images: their bytes stay booked until the slot is left ...
    if it was a 429: limiter.rate_limited(error.retry_after, response.headers, message)

How it decides when to grant a slot is in docs/design.md ("The limiter").
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imagebatch.configs.registry import parse_size
from imagebatch.configs.settings import LimitSettings
from imagebatch.tasks.headers import (
    limit_in_message,
    lower_headers,
    parse_reset,
    parse_retry_after,
)

_INFLIGHT = -1.0  # `_blocked` result: wait for a slot to be released
_EPS = 1e-9


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


BASE64 = 4 / 3  # a b64_json body is the image's bytes plus a third


def _pixels(size: str) -> int | None:
    """Pixels of a WxH size; None for `auto`, an unreadable size or a zero edge."""
    parsed = parse_size(size)
    return parsed[0] * parsed[1] if parsed else None


def _level(compression: Any) -> int | None:
    """output_compression as 0-100; None when not given (the server's default, 100)."""
    try:
        return min(100, max(0, int(compression)))
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class BodyEstimate:
    """What one request's answer is expected to weigh in memory, and what its real size teaches."""

    key: tuple[str, str, int | None]  # (model, output_format, output_compression)
    images: int
    pixels: int  # all images asked for, together
    bytes: int


class BodySizes:
    """Response sizes, estimated from bytes per pixel by format and learned from answers.

    Priors come from `[limits.bytes_per_pixel]`; each (model, format, compression) then
    learns its own figure. The learned figure rises fast and falls slowly: an underestimate
    lets too many bodies into memory, an overestimate only holds a request back a little.
    """

    RISE = 0.5
    FALL = 0.1
    MIN_COMPRESSED = 0.25  # bytes per pixel at output_compression 0, as a share of 100's

    def __init__(self, bytes_per_pixel: Mapping[str, float], auto_size: str = "1536x1024"):
        self._prior = {k.lower(): float(v) for k, v in bytes_per_pixel.items()}
        self._auto_pixels = _pixels(auto_size) or 1536 * 1024
        self._learned: dict[tuple[str, str, int | None], float] = {}

    def estimate(
        self, model: str, size: str, n: int, output_format: str = "", compression: Any = None
    ) -> BodyEstimate:
        """Bytes of the answer to one request (`auto` or an unreadable size: `auto_size`)."""
        fmt = (output_format or "png").lower()
        level = None if fmt == "png" else _level(compression)
        key = (model, fmt, level)
        pixels = (_pixels(size or "") or self._auto_pixels) * max(1, n)
        bpp = self._learned.get(key)
        if bpp is None:
            bpp = self._prior.get(fmt) or max(self._prior.values(), default=3.0)
            if level is not None:
                bpp *= self.MIN_COMPRESSED + (1 - self.MIN_COMPRESSED) * level / 100
        return BodyEstimate(key, max(1, n), pixels, math.ceil(pixels * bpp * BASE64))

    def learn(self, estimate: BodyEstimate, image_sizes: Sequence[int]) -> int:
        """Learn from the images of one answer; returns the bytes that answer weighs."""
        if not image_sizes:
            return 0
        observed = sum(image_sizes) / len(image_sizes) / (estimate.pixels / estimate.images)
        old = self._learned.get(estimate.key)
        if old is None:
            self._learned[estimate.key] = observed
        else:
            self._learned[estimate.key] = old + (self.RISE if observed > old else self.FALL) * (
                observed - old
            )
        return math.ceil(sum(image_sizes) * BASE64)

    def learned(self) -> dict[str, float]:
        """Bytes per pixel learned so far, by `model/format[/compression]` (for run.json)."""
        return {
            "/".join(str(p) for p in key if p is not None): round(v, 3)
            for key, v in self._learned.items()
        }


class _Bucket:
    """One rate dimension: `requests` (cost 1 per grant) or `images` (cost n per grant)."""

    __slots__ = (
        "bound_at",
        "burst_fraction",
        "configured",
        "drained_at",
        "estimate",
        "grants",
        "header_limit",
        "hold_until",
        "name",
        "provisional",
        "remaining",
        "span",
        "token_time",
        "tokens",
        "used",
    )

    def __init__(self, name: str, configured: float, span: float, burst_fraction: float) -> None:
        self.name = name
        self.configured = float(configured or 0)
        self.header_limit = 0.0
        self.estimate: float | None = None
        self.provisional = False  # estimated within the run's first window: a lower bound only
        self.span = span
        self.burst_fraction = burst_fraction
        self.grants: deque[tuple[float, float]] = deque()
        self.used = 0.0
        self.tokens: float | None = None  # None: full (set on first use with a rate)
        self.token_time = 0.0
        self.hold_until = -math.inf
        self.bound_at = -math.inf
        self.drained_at = -math.inf  # when the window falls to the estimate after a decrease
        self.remaining: float | None = None

    @property
    def limit(self) -> float | None:
        configured, header = self.configured, self.header_limit
        if configured > 0 and header > 0:
            return min(configured, header)
        return configured if configured > 0 else (header if header > 0 else None)

    def rate(self) -> float | None:
        limit = self.limit
        return limit if limit is not None else self.estimate

    def expire(self, now: float) -> None:
        grants = self.grants
        while grants and grants[0][0] + self.span <= now:
            self.used -= grants.popleft()[1]
        if not grants:
            self.used = 0.0

    def capacity(self, rate: float) -> float:
        return max(1.0, rate * self.burst_fraction)

    def refill(self, now: float, rate: float) -> None:
        cap = self.capacity(rate)
        if self.tokens is None:
            self.tokens, self.token_time = cap, now
        elif now > self.token_time:
            self.tokens = min(cap, self.tokens + (now - self.token_time) * rate / 60.0)
            self.token_time = now

    def delay(self, now: float, cost: float) -> float:
        """Seconds until `cost` units may be granted (0: now). Marks the bucket as binding."""
        wait = self.hold_until - now if self.hold_until > now else 0.0
        rate = self.rate()
        if rate is None:
            return wait
        self.expire(now)
        bound = 0.0
        if self.used > 0 and self.used + cost > rate + _EPS:
            # Oldest grants leave the window first; find the one whose exit makes room.
            need = self.used + cost - rate
            freed = 0.0
            leave_at = self.grants[-1][0] + self.span
            for t, c in self.grants:
                freed += c
                if freed >= need - _EPS:
                    leave_at = t + self.span
                    break
            bound = leave_at - now
        self.refill(now, rate)
        want = min(cost, self.capacity(rate))
        assert self.tokens is not None
        if self.tokens < want - _EPS:
            start = max(0.0, self.token_time - now)
            bound = max(bound, start + (want - self.tokens) * 60.0 / rate)
        if bound > 0:
            self.bound_at = now
        return max(wait, bound)

    def level_at(self, level: float, now: float) -> float:
        """When the units granted in the window will have fallen to `level` (now if they are)."""
        excess, at = self.used - level, now
        for t, c in self.grants:
            if excess <= _EPS:
                break
            excess -= c
            at = t + self.span
        return max(at, now)

    def take(self, now: float, cost: float) -> None:
        self.expire(now)
        self.grants.append((now, cost))
        self.used += cost
        if self.tokens is not None and self.rate() is not None:
            self.tokens -= cost

    def restart_pacing(self, at: float) -> None:
        """After a pause: about one unit available at `at`, then refill at the rate."""
        rate = self.rate()
        self.tokens = min(1.0, self.capacity(rate)) if rate is not None else None
        self.token_time = at

    def near_full(self, now: float) -> bool:
        limit = self.limit
        if limit is None:
            return False
        self.expire(now)
        return self.used >= 0.9 * limit or self.bound_at >= now - 5.0 or self.hold_until > now


class Permit:
    """One granted slot. Report the response with `record`; leaving `slot()` releases it,
    and its share of the memory budget with it (so store the images inside the slot)."""

    __slots__ = ("_body", "_booked", "_limiter", "_released", "granted_at", "images")

    def __init__(
        self, limiter: Limiter, images: int, granted_at: float, body: BodyEstimate | None
    ) -> None:
        self._limiter = limiter
        self.images = images
        self.granted_at = granted_at
        self._body = body
        self._booked = body.bytes if body is not None else 0
        self._released = False

    def record(
        self,
        headers: Mapping[str, str] | None,
        latency: float | None,
        image_sizes: Sequence[int] | None = None,
    ) -> None:
        """After a response of any status: learn limits from headers, feed the latency estimate.

        `latency` is the request's duration in seconds (None: no sample, e.g. a transport error).
        Samples from responses carrying a retry hint (429/503) are not latency of real work and
        are ignored. `image_sizes` (bytes of each image received) teaches the body estimate and
        books what this answer really weighs in place of its estimate.
        """
        self._limiter._record(headers, latency)
        if image_sizes and self._body is not None:
            actual = self._limiter._sizes.learn(self._body, image_sizes)
            if self._booked:  # still booked: the real weight replaces the estimate
                self._limiter._rebook(actual - self._booked)
                self._booked = actual

    def release(self) -> None:
        if not self._released:
            self._released = True
            booked, self._booked = self._booked, 0
            self._limiter._release()
            if booked:
                self._limiter._rebook(-booked)


class _Waiter:
    __slots__ = ("body", "future", "images")

    def __init__(self, future: asyncio.Future, images: int, body: BodyEstimate | None) -> None:
        self.future = future
        self.images = images
        self.body = body


class _Slot:
    """`async with limiter.slot(n) as permit:`: waits for a grant, releases on exit."""

    __slots__ = ("_body", "_images", "_limiter", "_permit")

    def __init__(self, limiter: Limiter, images: int, body: BodyEstimate | None) -> None:
        self._limiter = limiter
        self._images = images
        self._body = body
        self._permit: Permit | None = None

    async def __aenter__(self) -> Permit:
        self._permit = await self._limiter._acquire(self._images, self._body)
        return self._permit

    async def __aexit__(self, *exc: Any) -> None:
        if self._permit is not None:
            self._permit.release()


class Limiter:
    WINDOW = 60.0
    WINDOW_MARGIN = 0.5
    BURST_FRACTION = 0.1
    DEFAULT_PAUSE = 2.0
    MAX_PAUSE = 120.0
    SLOW_START = 8
    SLOW_START_PERIOD = 12.0
    LITTLE_HEADROOM = 1.5
    LITTLE_EXTRA = 2
    BETA = 0.9
    MAX_DECREASE = 0.5
    MIN_RATE = 1.0
    MAX_RATE = 1e7
    PROBE_GROWTH = 0.005
    PROBE_DOUBLING = 30.0
    PROBE_MAX = 0.05
    PROBE_USE = 0.85
    LATENCY_ALPHA = 0.1
    SIZE_ALPHA = 0.05
    SHORT_SLEEP = 0.5

    def __init__(
        self,
        *,
        rpm: float = 0,
        ipm: float = 0,
        max_in_flight: int = 0,
        max_in_flight_ceiling: int = 256,
        initial_latency: float = 20.0,
        max_bytes_in_flight: int = 0,
        body_sizes: BodySizes | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rpm < 0 or ipm < 0 or max_in_flight < 0 or max_bytes_in_flight < 0:
            raise ValueError("rpm, ipm, max_in_flight and max_bytes_in_flight must be >= 0")
        self._clock = clock
        self._sleep = sleep
        span = self.WINDOW + self.WINDOW_MARGIN
        self._requests = _Bucket("requests", rpm, span, self.BURST_FRACTION)
        self._images = _Bucket("images", ipm, span, self.BURST_FRACTION)
        self._buckets = (self._requests, self._images)
        self._fixed_cap = int(max_in_flight)
        self._ceiling = max(1, int(max_in_flight_ceiling))
        self._latency = float(initial_latency) if initial_latency > 0 else 20.0
        self._latency_samples = 0
        self._mean_images = 1.0
        self._sizes = body_sizes or BodySizes({"png": 3.0})
        self._bytes_budget = int(max_bytes_in_flight)
        self._bytes_in_flight = 0
        self._peak_bytes = 0
        self._mean_body: float | None = None

        now = clock()
        self._slow_cap = float(min(self.SLOW_START, self._ceiling))
        self._slow_tick = now
        self._cap_bound_at = -math.inf
        self._probe_tick = now

        self._in_flight = 0
        self._peak_in_flight = 0
        self._granted_requests = 0
        self._granted_images = 0
        self._queue: deque[_Waiter] = deque()
        self._pump_task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._waiting_for_release = False

        self._pause_until = -math.inf
        self._pauses = 0
        self._rate_limited = 0
        self._last_429 = -math.inf
        self._rejects: deque[float] = deque()
        self._granted_since_decrease = True
        self._first_grant: float | None = None

    @classmethod
    def from_settings(cls, limits: LimitSettings, **kwargs: Any) -> Limiter:
        """From `[limits]` (pass `configs.settings.resolve_limits(settings)` to apply the tier)."""
        return cls(
            rpm=limits.rpm,
            ipm=limits.ipm,
            max_in_flight=limits.max_in_flight,
            max_in_flight_ceiling=limits.max_in_flight_ceiling,
            initial_latency=limits.initial_latency,
            max_bytes_in_flight=limits.max_bytes_in_flight,
            body_sizes=BodySizes(limits.bytes_per_pixel, limits.auto_size),
            **kwargs,
        )

    # -- public -------------------------------------------------------------------------------

    def slot(self, images: int = 1, body: BodyEstimate | None = None) -> _Slot:
        """Wait for permission to send one request for `images` images (FIFO) whose answer
        is expected to weigh `body` (from `expected_body`; None: not counted in memory)."""
        images = int(images)
        if images < 1:
            raise ValueError("images must be >= 1")
        return _Slot(self, images, body)

    def expected_body(
        self, model: str, size: str, n: int, output_format: str = "", compression: Any = None
    ) -> BodyEstimate:
        """The expected answer to a request, for `slot`; learned from earlier answers."""
        return self._sizes.estimate(model, size, n, output_format, compression)

    def rate_limited(
        self,
        retry_after: float | None,
        headers: Mapping[str, str] | None = None,
        message: str | None = None,
    ) -> None:
        """A request got a 429 rate limit: pause every grant, slow down if the limit is unknown.
        A limit stated in the message ("...: Limit 300") counts as a limit header."""
        now = self._clock()
        self._rate_limited += 1
        self._last_429 = now
        self._rejects.append(now)
        if headers:
            self._learn(headers, now)
            if retry_after is None:
                retry_after = parse_retry_after(headers)
        stated = limit_in_message(message)
        if stated is not None:
            self._adopt_limit(
                self._requests if stated[0] == "requests" else self._images, stated[1]
            )
        pause = (
            self.DEFAULT_PAUSE
            if retry_after is None
            else min(max(0.0, retry_after), self.MAX_PAUSE)
        )
        until = now + pause
        if until > self._pause_until:
            if self._pause_until <= now and pause > 0:
                self._pauses += 1
            self._pause_until = until

        blamed = self._blame(now)
        # Only the first 429 after new grants lowers an estimate: the rest of a burst of refusals
        # answers requests sent before that decrease and carries no new information.
        if blamed is not None and (blamed.estimate is None or self._granted_since_decrease):
            self._granted_since_decrease = False
            self._decrease(blamed, now)

        resume = max(now, self._pause_until)
        for bucket in self._buckets:
            bucket.restart_pacing(resume)

    def _decrease(self, bucket: _Bucket, now: float) -> None:
        """AIMD's decrease: BETA x the units the server accepted from us in the window, so
        after a 429 at R units a minute the new rate is at least R/2.

        A later decrease at most halves the estimate (after a quiet spell our window holds
        little traffic, and one 429 must not collapse a working estimate). Nothing of ours
        accepted in the window: the server's budget went to traffic we cannot see (another
        process, a run just before this one); no evidence, no estimate. Until the window
        has drained to the new estimate it is not probed upwards (see `_probe`).
        """
        bucket.expire(now)
        self._expire_rejects(now)
        per_reject = self._mean_images if bucket is self._images else 1.0
        accepted = bucket.used - len(self._rejects) * per_reject
        if accepted < 1.0:
            return
        candidate = max(self.MIN_RATE, self.BETA * accepted)
        old = bucket.estimate
        if old is not None:
            candidate = min(old, max(candidate, old * self.MAX_DECREASE))
        bucket.estimate = max(self.MIN_RATE, candidate)
        bucket.drained_at = bucket.level_at(bucket.estimate, now)
        # Within the first window the server may still count traffic from before this run, so
        # the estimate can be far too low: it is then probed at full speed.
        span = self.WINDOW + self.WINDOW_MARGIN
        bucket.provisional = self._first_grant is None or now - self._first_grant < span

    @property
    def in_flight_cap(self) -> int:
        """How many requests may be in flight now; callers size their own backlog by it.
        With a memory budget, also how many bodies of the usual size fit in it."""
        cap = self._cap()
        if self._bytes_budget and self._mean_body:
            cap = min(cap, max(1, int(self._bytes_budget // self._mean_body)))
        return cap

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        for bucket in self._buckets:
            bucket.expire(now)
        req, img = self._requests, self._images
        return {
            "rpm_limit": req.limit,
            "ipm_limit": img.limit,
            "rpm_configured": req.configured or None,
            "ipm_configured": img.configured or None,
            "rpm_from_headers": req.header_limit or None,
            "ipm_from_headers": img.header_limit or None,
            "rpm_estimate": req.estimate if req.limit is None else None,
            "ipm_estimate": img.estimate if img.limit is None else None,
            "requests_last_window": req.used,
            "images_last_window": img.used,
            "remaining_requests": req.remaining,
            "remaining_images": img.remaining,
            "in_flight": self._in_flight,
            "peak_in_flight": self._peak_in_flight,
            "in_flight_cap": self.in_flight_cap,
            "max_bytes_in_flight": self._bytes_budget or None,
            "bytes_in_flight": self._bytes_in_flight,
            "peak_bytes_in_flight": self._peak_bytes,
            "bytes_per_pixel_learned": self._sizes.learned(),
            "queued": sum(1 for w in self._queue if not w.future.done()),
            "paused": self._pause_until > now,
            "pause_remaining": max(0.0, self._pause_until - now),
            "pauses": self._pauses,
            "rate_limited": self._rate_limited,
            "latency_estimate": self._latency,
            "mean_images_per_request": self._mean_images,
            "granted_requests": self._granted_requests,
            "granted_images": self._granted_images,
        }

    # -- granting ---------------------------------------------------------------------------

    async def _acquire(self, images: int, body: BodyEstimate | None) -> Permit:
        if not self._queue:
            now = self._clock()
            if self._blocked(images, body, now) == 0.0:
                return self._grant(images, body, now)
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiter(future, images, body))
        self._ensure_pump()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()
            else:
                future.cancel()
                self._wake.set()
            raise

    def _cap(self) -> int:
        if self._fixed_cap > 0:
            return self._fixed_cap
        rpm = self._request_rate()
        if rpm is None:
            return int(self._slow_cap)
        cap = math.ceil(rpm * self._latency / 60.0 * self.LITTLE_HEADROOM) + self.LITTLE_EXTRA
        return max(1, min(self._ceiling, cap))

    def _request_rate(self) -> float | None:
        rates = []
        r = self._requests.rate()
        if r is not None:
            rates.append(r)
        i = self._images.rate()
        if i is not None:
            rates.append(i / max(1.0, self._mean_images))
        return min(rates) if rates else None

    def _blocked(self, images: int, body: BodyEstimate | None, now: float) -> float:
        """0.0: grant now; _INFLIGHT: wait for a release; else seconds to wait."""
        if now < self._pause_until:
            return max(self._pause_until - now, 1e-6)
        wait = max(
            self._requests.delay(now, 1.0),
            self._images.delay(now, float(images)),
            self._unsampled_delay(now),
        )
        if wait > 0:
            return max(wait, 1e-6)
        if self._in_flight >= self._cap():
            self._cap_bound_at = now
            return _INFLIGHT
        if not self._fits(body):
            return _INFLIGHT
        return 0.0

    def _unsampled_delay(self, now: float) -> float:
        """Before the first latency sample of a slow start, at most SLOW_START grants per
        `initial_latency`: answers that teach nothing (429s, errors) free their slots at
        once, and must not turn the first in-flight cap into a stream of grants."""
        if self._latency_samples or self._fixed_cap > 0 or self._request_rate() is not None:
            return 0.0
        grants = self._requests.grants
        if len(grants) < self.SLOW_START:
            return 0.0
        oldest = grants[-self.SLOW_START][0]  # the SLOW_START-th most recent grant
        return max(0.0, oldest + self._latency - now)

    def _fits(self, body: BodyEstimate | None) -> bool:
        """The memory budget has room for `body`. With nothing booked anything fits, so an
        answer larger than the whole budget is still let through, alone."""
        if not self._bytes_budget or body is None or self._bytes_in_flight <= 0:
            return True
        return self._bytes_in_flight + body.bytes <= self._bytes_budget

    def _rebook(self, delta: int) -> None:
        """Bytes booked in the memory budget change by `delta` (a release wakes the queue)."""
        self._bytes_in_flight += delta
        self._peak_bytes = max(self._peak_bytes, self._bytes_in_flight)
        if delta < 0 and self._waiting_for_release:
            self._wake.set()

    def _grant(self, images: int, body: BodyEstimate | None, now: float) -> Permit:
        self._requests.take(now, 1.0)
        self._images.take(now, float(images))
        self._in_flight += 1
        if self._in_flight > self._peak_in_flight:
            self._peak_in_flight = self._in_flight
        self._granted_requests += 1
        self._granted_images += images
        self._granted_since_decrease = True
        if self._first_grant is None:
            self._first_grant = now
        self._mean_images += self.SIZE_ALPHA * (images - self._mean_images)
        if body is not None:
            self._rebook(body.bytes)
            mean = self._mean_body
            self._mean_body = (
                body.bytes if mean is None else mean + self.SIZE_ALPHA * (body.bytes - mean)
            )
        return Permit(self, images, now, body)

    def _release(self) -> None:
        self._in_flight -= 1
        if self._waiting_for_release:
            self._wake.set()

    def _ensure_pump(self) -> None:
        if self._pump_task is None:
            self._wake = asyncio.Event()  # fresh per pump: an Event binds to one event loop
            self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    def _dispatch(self) -> float | None:
        """Grant queued waiters in order. None: queue empty or waiting for a release."""
        now = self._clock()
        self._adapt(now)
        queue = self._queue
        while queue:
            waiter = queue[0]
            if waiter.future.done():  # cancelled while queued
                queue.popleft()
                continue
            blocked = self._blocked(waiter.images, waiter.body, now)
            if blocked == _INFLIGHT:
                return None
            if blocked > 0:
                return blocked
            queue.popleft()
            waiter.future.set_result(self._grant(waiter.images, waiter.body, now))
        return None

    async def _pump(self) -> None:
        try:
            while self._queue:
                self._wake.clear()
                delay = self._dispatch()
                if not self._queue:
                    break
                if delay is None:
                    self._waiting_for_release = True
                    try:
                        await self._wake.wait()
                    finally:
                        self._waiting_for_release = False
                elif delay <= self.SHORT_SLEEP:
                    await self._sleep(delay)
                else:
                    await self._sleep_or_wake(delay)
        except BaseException as exc:
            while self._queue:
                waiter = self._queue.popleft()
                if not waiter.future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        waiter.future.cancel()
                    else:
                        waiter.future.set_exception(exc)
            raise
        finally:
            self._pump_task = None

    async def _sleep_or_wake(self, delay: float) -> None:
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    # -- adapting -------------------------------------------------------------------------------

    def _adapt(self, now: float) -> None:
        """Slow start of the in-flight cap, and probing growth of learned rate estimates."""
        self._slow_start(now)
        if now - self._probe_tick >= 1.0:
            self._probe(now)
            self._probe_tick = now

    def _slow_start(self, now: float) -> None:
        """Before any rate is known the in-flight cap doubles per max(SLOW_START_PERIOD,
        latency) of being the constraint, grown smoothly. Not faster: without limit headers
        the first 429 comes only once a minute's budget is spent, and everything granted
        while it travels back is refused too, so the rate at that moment sets the burst."""
        if self._fixed_cap > 0 or self._request_rate() is not None or now <= self._slow_tick:
            return
        if self._cap_bound_at >= self._slow_tick:
            period = max(self.SLOW_START_PERIOD, self._latency)
            growth = 2.0 ** (min(now - self._slow_tick, period) / period)
            self._slow_cap = min(float(self._ceiling), self._slow_cap * growth)
        self._slow_tick = now

    def _probe(self, now: float) -> None:
        """Grow learned estimates that hold waiters back while the window is in use: 0.5 %/s,
        doubling per PROBE_DOUBLING s of calm, at most 5 %/s; provisional ones at 5 %/s.
        Not while the window drains what it held above a new estimate (the burst before a
        429): growing then would only end the wait early, into the same limit."""
        calm = min(now - max(self._last_429, self._pause_until), 20 * self.PROBE_DOUBLING)
        growth = min(
            self.PROBE_MAX, self.PROBE_GROWTH * 2.0 ** (max(0.0, calm) / self.PROBE_DOUBLING)
        )
        for bucket in self._buckets:
            estimate = bucket.estimate
            if bucket.limit is not None or estimate is None or bucket.bound_at < self._probe_tick:
                continue
            dt = min(now - max(self._probe_tick, bucket.drained_at), 30.0)
            if dt <= 0:
                continue
            bucket.expire(now)
            if bucket.provisional:
                bucket.estimate = min(self.MAX_RATE, estimate * (1.0 + self.PROBE_MAX * dt))
            elif bucket.used >= self.PROBE_USE * estimate:
                bucket.estimate = min(self.MAX_RATE, estimate * (1.0 + growth * dt))

    def _blame(self, now: float) -> _Bucket | None:
        """The bucket whose unknown limit a 429 reveals, if any."""
        req, img = self._requests, self._images
        req_known, img_known = req.limit is not None, img.limit is not None
        if not req_known and not img_known:
            return img  # images per minute also covers a request limit in proportion
        if req_known and img_known:
            return None
        known, unknown = (img, req) if img_known else (req, img)
        return None if known.near_full(now) else unknown

    def _expire_rejects(self, now: float) -> None:
        span = self.WINDOW + self.WINDOW_MARGIN
        while self._rejects and self._rejects[0] + span <= now:
            self._rejects.popleft()

    def _adopt_limit(self, bucket: _Bucket, limit: float) -> bool:
        """The server stated this bucket's limit: it replaces any estimate."""
        if limit == bucket.header_limit:
            return False
        bucket.header_limit = limit
        bucket.estimate = None
        self._wake.set()
        return True

    def _learn(self, headers: Mapping[str, str], now: float) -> None:
        h = lower_headers(headers)
        for bucket in self._buckets:
            limit = _number(h.get(f"x-ratelimit-limit-{bucket.name}"))
            if limit is not None and limit > 0:
                self._adopt_limit(bucket, limit)
            remaining = _number(h.get(f"x-ratelimit-remaining-{bucket.name}"))
            if remaining is None:
                continue
            bucket.remaining = remaining
            if remaining < 1:
                reset_text = h.get(f"x-ratelimit-reset-{bucket.name}")
                # an absolute Unix time is measured from the wall clock
                reset = parse_reset(reset_text)
                rate = bucket.rate()
                unit = 60.0 / rate if rate else 1.0
                hold = unit if reset is None else min(reset, unit)
                bucket.hold_until = max(bucket.hold_until, now + hold)

    def _record(self, headers: Mapping[str, str] | None, latency: float | None) -> None:
        h = lower_headers(headers)
        hinted = "retry-after" in h or "retry-after-ms" in h
        if latency is not None and latency >= 0 and math.isfinite(latency) and not hinted:
            if self._latency_samples == 0:
                self._latency = latency
                self._wake.set()  # ends `_unsampled_delay` early
            else:
                self._latency += self.LATENCY_ALPHA * (latency - self._latency)
            self._latency_samples += 1
        if h:
            self._learn(h, self._clock())
