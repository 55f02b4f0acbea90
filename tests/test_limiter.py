"""Limiter tests in virtual time: an event loop whose clock jumps to the next timer instead of waiting."""

import asyncio
import math
import random
import selectors
from collections import deque

import pytest

from imagebatch.configs.settings import LimitSettings
from imagebatch.tasks.headers import limit_in_message
from imagebatch.tasks.limiter import BodySizes, Limiter


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self, clock):
        super().__init__()
        self._clock = clock

    def select(self, timeout=None):
        if timeout is None:
            raise RuntimeError("deadlock: nothing scheduled and nothing ready")
        if timeout > 0:
            self._clock.now += timeout  # sleeping advances virtual time, instantly
        return super().select(0)


class VirtualClock:
    """Virtual time: `time()` is the clock, `sleep()` advances it; `run()` drives a coroutine."""

    def __init__(self, start=1000.0):
        self.now = start

    def time(self):
        return self.now

    async def sleep(self, seconds):
        await asyncio.sleep(seconds)

    def run(self, coro):
        loop = asyncio.SelectorEventLoop(_VirtualSelector(self))
        loop.time = self.time
        try:
            return loop.run_until_complete(coro)
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()


@pytest.fixture
def clock():
    return VirtualClock()


def make(clock, **kw):
    return Limiter(clock=clock.time, sleep=clock.sleep, **kw)


def grant_times(clock, limiter, sizes, hold=0.0):
    """Start one task per size in order; return [(grant time - start, size)] in grant order."""
    start = clock.time()
    granted = []

    async def one(n):
        async with limiter.slot(n):
            granted.append((clock.time() - start, n))
            await clock.sleep(hold)

    async def main():
        tasks = []
        for n in sizes:
            tasks.append(asyncio.ensure_future(one(n)))
            await asyncio.sleep(0)  # enqueue in this order
        await asyncio.gather(*tasks)

    clock.run(main())
    return granted


def max_in_window(granted, span=60.0):
    """Largest total size granted within any window of `span` seconds."""
    best, total, q = 0, 0, deque()
    for t, n in granted:
        q.append((t, n))
        total += n
        while q[0][0] <= t - span:
            total -= q.popleft()[1]
        best = max(best, total)
    return best


# -- known limits ----------------------------------------------------------------------------


def test_rpm_sliding_window(clock):
    limiter = make(clock, rpm=10)
    granted = grant_times(clock, limiter, [1] * 25)
    times = [t for t, _ in granted]
    assert max_in_window(granted) == 10
    # never more than 10 in any 60 s (with the safety margin: the 11th is > 60 s after the 1st)
    assert all(times[i + 10] - times[i] > 60.0 for i in range(len(times) - 10))
    # and not much slower than the limit: 25 requests in about 2.5 minutes
    assert times[-1] < 2.5 * 60 + 5
    assert times[9] < 60


def test_ipm_counts_images(clock):
    limiter = make(clock, ipm=20)
    sizes = [5, 1, 4, 3, 2, 5, 5, 1, 4, 5, 3, 2]  # 40 images
    granted = grant_times(clock, limiter, sizes)
    assert [n for _, n in granted] == sizes  # FIFO
    assert max_in_window(granted) <= 20
    assert max_in_window(granted) >= 15
    assert granted[-1][0] < 2 * 60 + 5


def test_rpm_and_ipm_together(clock):
    limiter = make(clock, rpm=6, ipm=100)
    granted = grant_times(clock, limiter, [4] * 12)
    assert max(sum(1 for t2, _ in granted if t <= t2 < t + 60) for t, _ in granted) <= 6
    assert max_in_window(granted) <= 24


def test_burst_is_limited_then_paced(clock):
    limiter = make(clock, rpm=600)
    granted = grant_times(clock, limiter, [1] * 200)
    times = [t for t, _ in granted]
    burst = sum(1 for t in times if t == 0)
    assert burst == 60  # a tenth of a minute's budget at once, no more
    gaps = [b - a for a, b in zip(times[60:], times[61:])]
    assert min(gaps) == pytest.approx(0.1)  # then one every 60/600 s
    assert times[-1] == pytest.approx(14.0)


def test_oversized_request_does_not_deadlock(clock):
    limiter = make(clock, ipm=5)
    granted = grant_times(clock, limiter, [1, 10, 1])
    assert [n for _, n in granted] == [1, 10, 1]
    assert granted[1][0] > 60  # waited for an empty window
    assert granted[2][0] > granted[1][0] + 60


def test_in_flight_cap(clock):
    limiter = make(clock, max_in_flight=3)
    granted = grant_times(clock, limiter, [1] * 10, hold=1.0)
    times = [round(t, 6) for t, _ in granted]
    assert times == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert limiter.snapshot()["peak_in_flight"] == 3
    assert limiter.snapshot()["in_flight"] == 0


def test_fifo_order_with_mixed_sizes(clock):
    limiter = make(clock, ipm=12, max_in_flight=2)
    sizes = [3, 6, 1, 1, 6, 2, 1, 4]
    granted = grant_times(clock, limiter, sizes, hold=0.5)
    assert [n for _, n in granted] == sizes
    assert max_in_window(granted) <= 12


def test_cancelled_waiters_free_their_place(clock):
    limiter = make(clock, max_in_flight=1)
    order = []

    async def one(tag, hold):
        async with limiter.slot():
            order.append((tag, clock.time() - 1000.0))
            await clock.sleep(hold)

    async def main():
        first = asyncio.ensure_future(one("a", 5))
        await asyncio.sleep(0)
        doomed = asyncio.ensure_future(one("b", 5))
        await asyncio.sleep(0)
        last = asyncio.ensure_future(one("c", 1))
        await clock.sleep(1)
        doomed.cancel()
        await asyncio.gather(first, last)
        with pytest.raises(asyncio.CancelledError):
            await doomed

    clock.run(main())
    assert order == [("a", 0.0), ("c", 5.0)]
    assert limiter.snapshot()["in_flight"] == 0


def test_from_settings():
    limiter = Limiter.from_settings(
        LimitSettings(rpm=7, ipm=50, max_in_flight=4, max_in_flight_ceiling=9, initial_latency=3)
    )
    snap = limiter.snapshot()
    assert (
        snap["rpm_limit"],
        snap["ipm_limit"],
        snap["in_flight_cap"],
        snap["latency_estimate"],
    ) == (7, 50, 4, 3)


# -- in flight by Little's law ------------------------------------------------------------------


def test_littles_law_cap(clock):
    limiter = make(clock, ipm=600, initial_latency=20.0)
    assert limiter.snapshot()["in_flight_cap"] == 256  # 600 * 20 / 60 * 1.5 + 2 = 302, clamped
    permit = clock.run(_take(limiter))
    permit.record({}, 4.0)  # the first measurement replaces the assumption
    assert limiter.snapshot()["latency_estimate"] == 4.0
    assert limiter.snapshot()["in_flight_cap"] == math.ceil(600 * 4 / 60 * 1.5) + 2  # 62
    for _ in range(60):
        permit.record({}, 10.0)
    assert limiter.snapshot()["latency_estimate"] == pytest.approx(10.0, abs=0.05)
    assert limiter.snapshot()["in_flight_cap"] == math.ceil(600 * 10 / 60 * 1.5) + 2  # 152
    permit.record({"retry-after": "1"}, 0.01)  # a fast 429 is not a latency sample
    assert limiter.snapshot()["latency_estimate"] == pytest.approx(10.0, abs=0.05)


def test_little_uses_mean_images_and_ceiling_and_fixed(clock):
    limiter = make(clock, ipm=600, initial_latency=6.0, max_in_flight_ceiling=40)
    assert limiter.snapshot()["in_flight_cap"] == 40
    fixed = make(clock, ipm=600, max_in_flight=5)
    assert fixed.snapshot()["in_flight_cap"] == 5
    unknown = make(clock)
    assert unknown.snapshot()["in_flight_cap"] == 8


async def _take(limiter, n=1):
    async with limiter.slot(n) as permit:
        return permit


# -- learning from headers -------------------------------------------------------------------


def test_adopts_limit_headers_when_unknown(clock):
    limiter = make(clock)
    permit = clock.run(_take(limiter))
    permit.record({"X-RateLimit-Limit-Requests": "30", "x-ratelimit-limit-images": "50"}, 1.0)
    snap = limiter.snapshot()
    assert (snap["rpm_limit"], snap["ipm_limit"]) == (30, 50)
    granted = grant_times(clock, limiter, [1] * 40)
    assert max_in_window(granted) <= 30 - 1  # one was granted before


def test_configured_limit_wins_over_a_higher_header_but_not_a_lower_one(clock):
    limiter = make(clock, ipm=100)
    permit = clock.run(_take(limiter))
    permit.record({"x-ratelimit-limit-images": "500"}, 1.0)
    assert limiter.snapshot()["ipm_limit"] == 100
    permit.record({"x-ratelimit-limit-images": "40"}, 1.0)
    assert limiter.snapshot()["ipm_limit"] == 40


def test_exhausted_bucket_is_held(clock):
    limiter = make(clock, rpm=60)
    permit = clock.run(_take(limiter))
    permit.record({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s"}, 1.0)
    start = clock.time()
    clock.run(_take(limiter))
    # held for min(reset, one request's refill time at 60 rpm = 1 s)
    assert clock.time() - start == pytest.approx(1.0)
    permit.record(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "250ms"}, 1.0
    )
    start = clock.time()
    clock.run(_take(limiter))
    assert clock.time() - start == pytest.approx(0.25)
    assert limiter.snapshot()["remaining_requests"] == 0
    permit.record({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "20s"}, 1.0)
    start = clock.time()
    clock.run(_take(limiter))
    assert clock.time() == start  # room left: no hold


# -- 429: pause and ramp ------------------------------------------------------------------------


def test_rate_limited_pauses_everyone_then_ramps(clock):
    limiter = make(clock, rpm=600)
    start = clock.time()
    granted = []

    async def one():
        async with limiter.slot():
            granted.append(clock.time() - start)

    async def main():
        await clock.sleep(10)  # the pacing bucket is full again
        limiter.rate_limited(5.0)
        await asyncio.gather(*(one() for _ in range(30)))

    clock.run(main())
    assert min(granted) == pytest.approx(15.0)  # nobody before the pause ends
    gaps = [b - a for a, b in zip(granted, granted[1:])]
    assert all(g == pytest.approx(0.1) for g in gaps)  # released one by one at the limit rate
    snap = limiter.snapshot()
    assert snap["pauses"] == 1 and snap["rate_limited"] == 1


def test_rate_limited_default_pause_and_extension(clock):
    limiter = make(clock, rpm=600)
    limiter.rate_limited(None)
    assert limiter.snapshot()["pause_remaining"] == pytest.approx(2.0)
    limiter.rate_limited(None, {"retry-after-ms": "7000"})
    assert limiter.snapshot()["pause_remaining"] == pytest.approx(7.0)
    limiter.rate_limited(1.0)  # a shorter hint does not shorten the pause
    snap = limiter.snapshot()
    assert snap["pause_remaining"] == pytest.approx(7.0)
    assert (snap["pauses"], snap["rate_limited"]) == (1, 3)
    start = clock.time()
    clock.run(_take(limiter))
    assert clock.time() - start == pytest.approx(7.0)


def test_unknown_limit_estimate_from_a_429(clock):
    limiter = make(clock, max_in_flight=100)
    granted = grant_times(clock, limiter, [1] * 50)
    assert len(granted) == 50
    limiter.rate_limited(1.0)
    # 0.9 x (50 sent - 1 refused)
    assert limiter.snapshot()["ipm_estimate"] == pytest.approx(0.9 * 49)
    for _ in range(4):  # the rest of the same burst of refusals: nothing new was sent
        limiter.rate_limited(1.0)
    assert limiter.snapshot()["ipm_estimate"] == pytest.approx(0.9 * 49)
    assert limiter.snapshot()["ipm_limit"] is None


def test_a_429_after_a_quiet_spell_at_most_halves_the_estimate(clock):
    limiter = make(clock, max_in_flight=100)
    grant_times(clock, limiter, [1] * 50)
    limiter.rate_limited(1.0)
    clock.run(clock.sleep(120))  # the window empties
    clock.run(_take(limiter))
    before = limiter.snapshot()["ipm_estimate"]
    limiter.rate_limited(1.0)  # 1 sent in the window, and refused: no evidence of a lower limit
    assert limiter.snapshot()["ipm_estimate"] == before
    clock.run(_take(limiter))
    clock.run(_take(limiter))
    before = limiter.snapshot()["ipm_estimate"]
    assert before > 40
    limiter.rate_limited(1.0)  # 2 more sent, 1 accepted: 0.9 x 1 would collapse it
    assert limiter.snapshot()["ipm_estimate"] == pytest.approx(before / 2)


def test_unknown_request_limit_blamed_when_image_limit_has_room(clock):
    limiter = make(clock, ipm=1000, max_in_flight=100)
    grant_times(clock, limiter, [1] * 20)
    limiter.rate_limited(1.0)
    snap = limiter.snapshot()
    assert snap["rpm_estimate"] == pytest.approx(0.9 * 19)
    assert snap["ipm_estimate"] is None and snap["ipm_limit"] == 1000


def test_known_limits_are_not_lowered_by_a_429(clock):
    limiter = make(clock, rpm=100, ipm=100)
    limiter.rate_limited(1.0)
    snap = limiter.snapshot()
    assert (snap["rpm_limit"], snap["ipm_limit"], snap["rpm_estimate"], snap["ipm_estimate"]) == (
        100,
        100,
        None,
        None,
    )


def test_a_429_without_accepted_traffic_sets_no_estimate(clock):
    limiter = make(clock)
    clock.run(_take(limiter))
    limiter.rate_limited(0.5)  # the only request we sent was the one refused
    assert limiter.snapshot()["ipm_estimate"] is None
    assert limiter.snapshot()["pause_remaining"] == pytest.approx(0.5)


def test_header_replaces_estimate(clock):
    limiter = make(clock)
    grant_times(clock, limiter, [1] * 9)
    permit = clock.run(_take(limiter))
    limiter.rate_limited(0.5)
    assert limiter.snapshot()["ipm_estimate"] == pytest.approx(0.9 * 9)
    permit.record({"x-ratelimit-limit-images": "250"}, 1.0)
    snap = limiter.snapshot()
    assert snap["ipm_limit"] == 250 and snap["ipm_estimate"] is None


# -- unknown limits against a fake server ----------------------------------------------------------


class FakeServer:
    """Sliding 60 s window over arrivals; refuses with 429 + retry-after once the window is full."""

    def __init__(self, clock, ipm=0, latency=lambda: 0.5, delay=lambda: 0.002, headers=False):
        self.clock, self.ipm, self.latency, self.delay, self.headers = (
            clock,
            ipm,
            latency,
            delay,
            headers,
        )
        self.window = deque()
        self.used = 0
        self.accepted = []
        self.refused = 0

    async def request(self, n):
        await self.clock.sleep(self.delay())
        now = self.clock.time()
        while self.window and self.window[0][0] <= now - 60:
            self.used -= self.window.popleft()[1]
        headers = {"x-ratelimit-limit-images": str(self.ipm)} if self.headers else {}
        if self.ipm and self.used + n > self.ipm:
            self.refused += 1
            wait = self.window[0][0] + 60 - now if self.window else 1.0
            await self.clock.sleep(0.01)
            return 429, headers, wait
        self.window.append((now, n))
        self.used += n
        await self.clock.sleep(self.latency())
        self.accepted.append((self.clock.time(), n))
        return 200, headers, None


def drive(clock, limiter, server, jobs, duration, size=lambda: 1):
    """One task per job; on 429 tell the limiter, wait the hint, go again."""

    async def job():
        n = size()
        while True:
            async with limiter.slot(n) as permit:
                sent = clock.time()
                status, headers, hint = await server.request(n)
                permit.record(headers, clock.time() - sent)
            if status != 429:
                return
            limiter.rate_limited(hint, headers)
            await clock.sleep(hint)

    async def main():
        tasks = [asyncio.ensure_future(job()) for _ in range(jobs)]
        await asyncio.wait(tasks, timeout=duration)

    start = clock.time()
    clock.run(main())
    return start


def rate_between(server, start, a, b):
    return sum(n for t, n in server.accepted if start + a <= t < start + b) / ((b - a) / 60)


@pytest.mark.parametrize(
    "limit, latency", [(120, lambda: 0.5), (600, lambda: random.uniform(1, 5))]
)
def test_aimd_converges_to_an_unknown_limit(clock, limit, latency):
    random.seed(7)
    limiter = make(clock)
    server = FakeServer(clock, ipm=limit, latency=latency)
    start = drive(clock, limiter, server, jobs=limit * 6, duration=300)
    achieved = rate_between(server, start, 120, 300)
    refused_share = server.refused / (server.refused + len(server.accepted))
    assert achieved >= 0.85 * limit
    assert achieved <= limit
    assert refused_share <= 0.05
    estimate = limiter.snapshot()["ipm_estimate"]  # a working rate that probes above the limit
    assert 0.75 * limit <= estimate <= 1.5 * limit


def test_known_limit_is_held_exactly_with_jittery_arrivals(clock):
    random.seed(3)
    limiter = make(clock, ipm=600)
    server = FakeServer(
        clock, ipm=600, latency=lambda: random.uniform(0.5, 3), delay=lambda: random.expovariate(20)
    )
    start = drive(clock, limiter, server, jobs=4000, duration=180)
    assert rate_between(server, start, 0, 180) >= 0.97 * 600
    assert server.refused <= 0.01 * len(server.accepted)


def test_limit_header_is_adopted_without_429s(clock):
    limiter = make(clock)
    server = FakeServer(clock, ipm=300, headers=True, latency=lambda: 1.0)
    start = drive(clock, limiter, server, jobs=1500, duration=180)
    assert server.refused == 0
    assert rate_between(server, start, 0, 180) >= 0.97 * 300
    assert limiter.snapshot()["ipm_limit"] == 300


def test_unlimited_server_runs_at_the_ceiling(clock):
    limiter = make(clock, max_in_flight_ceiling=64)
    server = FakeServer(clock, ipm=0, latency=lambda: 1.0)
    start = drive(clock, limiter, server, jobs=3000, duration=120)
    snap = limiter.snapshot()
    assert snap["peak_in_flight"] == 64  # slow start reached the ceiling
    assert snap["rate_limited"] == 0
    # 3000 requests at 64 in flight and 1 s each: about 47 s plus the slow start, which
    # doubles from 8 to 64 in three periods of SLOW_START_PERIOD (the answers take less)
    ramp = 3 * Limiter.SLOW_START_PERIOD
    last = max(t for t, _ in server.accepted) - start
    assert last < 47 + ramp
    assert rate_between(server, start, ramp + 5, ramp + 25) >= 0.95 * 64 * 60


def test_snapshot_keys(clock):
    snap = make(clock).snapshot()
    for key in (
        "rpm_limit",
        "ipm_limit",
        "rpm_estimate",
        "ipm_estimate",
        "in_flight",
        "peak_in_flight",
        "in_flight_cap",
        "queued",
        "pauses",
        "rate_limited",
        "latency_estimate",
        "paused",
    ):
        assert key in snap


def test_reset_given_as_absolute_unix_time_is_read_as_a_time(clock):
    """Some compatible servers send the reset moment, not a duration: one already past holds
    nothing."""
    import time as wall

    limiter = make(clock, rpm=60)
    permit = clock.run(_take(limiter))
    past = str(int(wall.time()) - 5)
    permit.record({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": past}, 1.0)
    start = clock.time()
    clock.run(_take(limiter))
    assert clock.time() == start  # misread as 1.8e9 seconds it would hold one refill (1 s)


# -- memory budget ------------------------------------------------------------------------------

MB = 1_000_000


def sizes(**prior):
    return BodySizes(prior or {"png": 3.0, "jpeg": 1.0, "webp": 0.8}, "1536x1024")


def run_with_bodies(clock, limiter, bodies, hold=1.0, image_sizes=None):
    """One task per body, started in order; returns (peak concurrency, [(start, end, bytes)])."""
    state = {"now": 0, "peak": 0}
    spans = []

    async def one(body, learned):
        async with limiter.slot(1, body) as permit:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            start = clock.time()
            await clock.sleep(hold)
            if learned is not None:
                permit.record({}, hold, learned)
            state["now"] -= 1
            spans.append((start, clock.time(), body.bytes))

    async def main():
        tasks = []
        for i, body in enumerate(bodies):
            learned = image_sizes[i] if image_sizes else None
            tasks.append(asyncio.ensure_future(one(body, learned)))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)

    clock.run(main())
    return state["peak"], spans


def test_expected_body_from_size_format_and_compression():
    est = sizes().estimate
    png = est("gpt-image-2", "1024x1024", 1)
    assert png.bytes == math.ceil(1024 * 1024 * 3.0 * 4 / 3)  # ~4.2 MB of base64
    assert est("gpt-image-2", "1024x1024", 4).bytes == pytest.approx(4 * png.bytes, abs=4)
    assert est("gpt-image-2", "auto", 1).pixels == 1536 * 1024
    assert est("gpt-image-2", "", 1).pixels == 1536 * 1024
    jpeg100 = est("gpt-image-2", "1024x1024", 1, "jpeg").bytes
    assert jpeg100 == est("gpt-image-2", "1024x1024", 1, "jpeg", 100).bytes
    assert est("gpt-image-2", "1024x1024", 1, "jpeg", 50).bytes < jpeg100 < png.bytes
    assert est("gpt-image-2", "1024x1024", 1, "webp", 100).bytes < jpeg100
    # a format without a prior is assumed as heavy as the heaviest known one
    assert est("m", "1024x1024", 1, "tiff").bytes == png.bytes


def test_learned_size_is_per_model_format_and_compression():
    body = sizes()
    first = body.estimate("gpt-image-2", "1000x1000", 2, "jpeg", 80)
    assert body.learn(first, [500_000, 700_000]) == math.ceil(1_200_000 * 4 / 3)
    assert body.estimate("gpt-image-2", "1000x1000", 1, "jpeg", 80).bytes == math.ceil(
        0.6 * 1e6 * 4 / 3
    )
    # other compressions, formats and models keep their own figures
    prior_at_50 = 1.0 * (0.25 + 0.75 * 0.5)  # jpeg's prior, scaled down for compression 50
    assert body.estimate("gpt-image-2", "1000x1000", 1, "jpeg", 50).bytes == math.ceil(
        prior_at_50 * 1e6 * 4 / 3
    )
    assert body.estimate("gpt-image-1", "1000x1000", 1, "jpeg", 80).bytes > 1e6
    # rises fast, falls slowly: memory must not be underestimated for long
    body.learn(first, [1_400_000, 1_400_000])  # 1.4 bytes per pixel observed
    assert body.learned()["gpt-image-2/jpeg/80"] == pytest.approx(0.6 + 0.5 * 0.8)
    body.learn(first, [200_000, 200_000])
    assert body.learned()["gpt-image-2/jpeg/80"] == pytest.approx(1.0 - 0.1 * 0.8)
    # a short answer (fewer images than asked) is learned per image received
    short = sizes()
    short.learn(short.estimate("m", "1000x1000", 4), [2_000_000])
    assert short.learned() == {"m/png": 2.0}


@pytest.mark.parametrize("budget, expected", [(10 * MB, 2), (40 * MB, 10), (41 * MB, 10)])
def test_memory_budget_bounds_requests_in_flight(clock, budget, expected):
    limiter = make(clock, max_in_flight=100, max_bytes_in_flight=budget, body_sizes=sizes())
    body = limiter.expected_body("gpt-image-2", "1000x1000", 1)  # 3 MB as PNG, 4 MB as base64
    assert body.bytes == 4 * MB
    peak, spans = run_with_bodies(clock, limiter, [body] * 30)
    assert peak == max(1, budget // body.bytes) == expected
    assert len(spans) == 30
    snap = limiter.snapshot()
    assert snap["bytes_in_flight"] == 0 and snap["peak_bytes_in_flight"] == expected * 4 * MB
    assert snap["in_flight_cap"] == expected  # the flow sizes its backlog by it


def test_without_a_budget_bodies_do_not_limit(clock):
    limiter = make(clock, max_in_flight=100, body_sizes=sizes())
    body = limiter.expected_body("gpt-image-2", "1000x1000", 1)
    peak, _ = run_with_bodies(clock, limiter, [body] * 30)
    assert peak == 30


def test_a_request_larger_than_the_budget_goes_alone(clock):
    limiter = make(clock, max_in_flight=100, max_bytes_in_flight=10 * MB, body_sizes=sizes())
    small = limiter.expected_body("gpt-image-2", "1000x1000", 1)  # 4 MB
    huge = limiter.expected_body("gpt-image-2", "1000x1000", 10)  # 40 MB
    peak, spans = run_with_bodies(clock, limiter, [small, huge, small, small])
    assert len(spans) == 4  # it was not refused, nor did it block the queue forever
    (huge_start, huge_end, _) = next(s for s in spans if s[2] == huge.bytes)
    others = [s for s in spans if s[2] != huge.bytes]
    assert all(end <= huge_start or start >= huge_end for start, end, _ in others)  # alone
    assert peak == 2  # the two small ones after it share the budget


def test_learned_sizes_change_how_many_fit(clock):
    limiter = make(clock, max_in_flight=100, max_bytes_in_flight=40 * MB, body_sizes=sizes())
    guess = limiter.expected_body("gpt-image-2", "1000x1000", 1)
    assert guess.bytes == 4 * MB
    # answers twice as heavy as the prior: 8 MB each as base64, so 5 fit, not 10
    peak, _ = run_with_bodies(clock, limiter, [guess], image_sizes=[[6 * MB]])
    learned = limiter.expected_body("gpt-image-2", "1000x1000", 1)
    assert learned.bytes == 8 * MB
    peak, _ = run_with_bodies(clock, limiter, [learned] * 20)
    assert peak == 5
    # and lighter ones let more in (learned downwards slowly, but learned)
    light = make(clock, max_in_flight=100, max_bytes_in_flight=40 * MB, body_sizes=sizes())
    run_with_bodies(clock, light, [guess], image_sizes=[[1_500_000]])
    body = light.expected_body("gpt-image-2", "1000x1000", 1)
    assert body.bytes == 2 * MB
    peak, _ = run_with_bodies(clock, light, [body] * 40)
    assert peak == 20


def test_record_books_the_real_weight_until_the_slot_is_left(clock):
    limiter = make(clock, max_in_flight=100, max_bytes_in_flight=10 * MB, body_sizes=sizes())
    body = limiter.expected_body("gpt-image-2", "1000x1000", 1)  # 4 MB estimated
    order = []

    async def first():
        async with limiter.slot(1, body) as permit:
            permit.record({}, 1.0, [6 * MB])  # really 8 MB as base64: no room for another 4
            assert limiter.snapshot()["bytes_in_flight"] == 8 * MB
            await clock.sleep(5)  # storing the images: still in memory
            order.append(("stored", clock.time()))

    async def second():
        await asyncio.sleep(0)
        async with limiter.slot(1, body):
            order.append(("second granted", clock.time()))

    async def main():
        await asyncio.gather(first(), second())

    start = clock.time()
    clock.run(main())
    assert [(what, t - start) for what, t in order] == [("stored", 5.0), ("second granted", 5.0)]
    assert limiter.snapshot()["bytes_in_flight"] == 0


def test_a_cancelled_waiter_books_no_bytes(clock):
    limiter = make(clock, max_in_flight=100, max_bytes_in_flight=5 * MB, body_sizes=sizes())
    body = limiter.expected_body("gpt-image-2", "1000x1000", 1)

    async def holder():
        async with limiter.slot(1, body):
            await clock.sleep(3)

    async def main():
        first = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(holder())
        await clock.sleep(1)
        waiting.cancel()
        await asyncio.gather(first, waiting, return_exceptions=True)

    clock.run(main())
    assert limiter.snapshot()["bytes_in_flight"] == 0


def test_budget_settings_reach_the_limiter(clock):
    limits = LimitSettings(max_bytes_in_flight=12 * MB, bytes_per_pixel={"png": 2.0})
    limiter = Limiter.from_settings(limits, clock=clock.time, sleep=clock.sleep)
    assert limiter.snapshot()["max_bytes_in_flight"] == 12 * MB
    assert limiter.expected_body("m", "auto", 1).bytes == math.ceil(1536 * 1024 * 2.0 * 4 / 3)


@pytest.mark.parametrize(
    "toml, words",
    [
        ("[limits]\nmax_bytes_in_flight = -1\n", "max_bytes_in_flight"),
        ("[limits.bytes_per_pixel]\npng = 0\n", "bytes_per_pixel"),
        ('[limits]\nauto_size = "big"\n', "auto_size must be WxH"),
    ],
)
def test_bad_budget_settings_are_refused_by_name(tmp_path, toml, words):
    from imagebatch.configs.errors import ConfigError
    from imagebatch.configs.settings import load_settings

    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=words):
        load_settings(path, env={})


# -- discovery without headers: slow start and the decrease ----------------------------------


class BucketServer:
    """A token bucket of a full minute's images, full at start (as bench/refserver.py):
    no limit headers, 429s answered after `refusal_delay` with the wait the bucket needs."""

    def __init__(self, clock, ipm, refusal_delay=0.5):
        self.clock, self.ipm, self.refusal_delay = clock, ipm, refusal_delay
        self.tokens, self.at = float(ipm), clock.time()
        self.accepted, self.refused = [], 0

    async def request(self, n):
        await self.clock.sleep(self.refusal_delay / 2)
        now = self.clock.time()
        self.tokens = min(self.ipm, self.tokens + (now - self.at) * self.ipm / 60)
        self.at = now
        if self.tokens < n:
            self.refused += 1
            await self.clock.sleep(self.refusal_delay / 2)
            return 429, (n - self.tokens) * 60 / self.ipm
        self.tokens -= n
        await self.clock.sleep(random.uniform(1, 3))
        self.accepted.append(self.clock.time())
        return 200, None


def drive_like_dispatch(clock, limiter, server, jobs, duration=600):
    """As tasks/dispatch.py does: a 429 is no latency sample and pauses the limiter before
    its slot is released; the job then waits the hint and asks again."""

    async def job():
        while True:
            async with limiter.slot(1) as permit:
                sent = clock.time()
                status, hint = await server.request(1)
                if status == 429:
                    permit.record({}, None)
                    limiter.rate_limited(hint)
                else:
                    permit.record({}, clock.time() - sent)
            if status != 429:
                return
            await clock.sleep(hint)

    async def main():
        await asyncio.wait([asyncio.ensure_future(job()) for _ in range(jobs)], timeout=duration)

    start = clock.time()
    clock.run(main())
    return start


def first_full_minute(times, start, share):
    """Seconds after `start` when `share` of the limit had been billed within 60 s."""
    times = sorted(times)
    for i, t in enumerate(times):
        if i + 1 >= share and times[i + 1 - int(share)] > t - 60:
            return t - start
    return None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_unknown_limit_discovery_of_the_issue_stays_under_5_percent(clock, seed):
    """Issue 13's case: 300 images per minute, 600 jobs, no limit headers, refusals taking
    0.3 s to come back (0.11-0.19 s measured against bench/refserver.py on this 2-core
    machine under load). The first burst that overshoots is bounded by slow start's pace
    (the pace before this change refused 5.7-6.7 % here), and 0.85 of the limit is still
    reached well within two minutes."""
    random.seed(seed)
    limiter = make(clock)
    server = BucketServer(clock, ipm=300, refusal_delay=0.3)
    start = drive_like_dispatch(clock, limiter, server, jobs=600)
    assert len(server.accepted) == 600
    assert server.refused / (server.refused + 600) < 0.05
    reached = first_full_minute(server.accepted, start, 0.85 * 300)
    assert reached is not None and reached < 120


def test_before_the_first_latency_sample_grants_are_few(clock):
    """Answers that teach nothing (429s, errors) free their slots at once: until one answer
    carries a latency, at most SLOW_START grants per initial_latency."""
    limiter = make(clock, initial_latency=20.0)
    granted = []

    async def one(i):
        async with limiter.slot() as permit:
            granted.append(clock.time() - 1000.0)
            await clock.sleep(0.05)
            permit.record({}, None)  # an error answer: no latency sample

    async def main():
        await asyncio.gather(*(one(i) for i in range(30)))

    clock.run(main())
    assert max_in_window([(t, 1) for t in granted], span=20.0) == Limiter.SLOW_START
    # and the first sample lets the rest go at once
    limiter2 = make(clock, initial_latency=20.0)
    times = []

    async def sampled(i):
        async with limiter2.slot() as permit:
            times.append(clock.time())
            await clock.sleep(1.0)
            permit.record({}, 1.0 if i == 0 else None)

    async def main2():
        await asyncio.gather(*(sampled(i) for i in range(20)))

    start = clock.time()
    clock.run(main2())
    assert max(times) - start < 5.0


def test_slow_start_doubles_no_faster_than_its_period(clock):
    """A fast server (0.1 s answers) still sees the in-flight cap double at most once per
    SLOW_START_PERIOD: a limit nobody announced is met at a bounded pace."""
    limiter = make(clock, max_in_flight_ceiling=256)
    server = FakeServer(clock, ipm=0, latency=lambda: 0.1)
    drive(clock, limiter, server, jobs=20000, duration=2 * Limiter.SLOW_START_PERIOD)
    peak = limiter.snapshot()["peak_in_flight"]
    assert Limiter.SLOW_START * 2 <= peak <= Limiter.SLOW_START * 4 + 1


def test_first_decrease_keeps_most_of_what_the_server_accepted(clock):
    """After a 429 at R images per minute accepted, the new rate is at least R/2 (BETA x R)."""
    limiter = make(clock, max_in_flight=1000)
    grant_times(clock, limiter, [1] * 200)
    clock.run(clock.sleep(30))
    grant_times(clock, limiter, [1] * 100)  # 300 accepted in the last minute
    limiter.rate_limited(1.0)  # the 300th was refused: 299 accepted
    assert limiter.snapshot()["ipm_estimate"] == pytest.approx(0.9 * 299)
    assert limiter.snapshot()["ipm_estimate"] >= 300 / 2


def test_no_probing_while_the_window_drains_the_burst_before_a_429(clock):
    """After a 429 the window still holds the burst that overshot; the estimate waits for
    it to drain instead of growing, which would only end the wait early into the limit."""
    limiter = make(clock, max_in_flight=1000)
    grant_times(clock, limiter, [1] * 100)
    limiter.rate_limited(0.1)
    estimate = limiter.snapshot()["ipm_estimate"]
    assert estimate == pytest.approx(0.9 * 99)
    start = clock.time()
    clock.run(_take(limiter))
    assert clock.time() - start == pytest.approx(60.5)  # the whole burst left the window
    assert limiter.snapshot()["ipm_estimate"] == pytest.approx(estimate)


# -- the limit a 429's message states ------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "stated"),
    [
        (
            "Rate limit reached for gpt-image-2 in organization org-x on images per min (IPM): "
            "Limit 5, Used 5, Requested 1. Please try again in 12s.",
            ("images", 5.0),
        ),
        (
            "Rate limit reached for dall-e-3 in organization org-x on requests per min (RPM): "
            "Limit 7, Used 7, Requested 1.",
            ("requests", 7.0),
        ),
        (
            "Request too large for gpt-image-1 in organization org-x on images per min (IPM): "
            "Limit 4, Requested 10. Reduce n to run successfully.",
            ("images", 4.0),
        ),
        # buckets the limiter does not pace, other wordings, nonsense
        ("... on input-images per min: Limit 250, Used 250, Requested 1.", None),
        ("... on tokens per min (TPM): Limit 40000, Used 39000, Requested 2000.", None),
        ("Requests have exceeded the call rate limit of your tier. Retry after 10 s.", None),
        ("on images per min (IPM): Limit 0, Used 0", None),
        ("on images per min (IPM): Limit -5", None),
        ("Limit " * 20_000, None),
        (None, None),
    ],
)
def test_limit_in_message(message, stated):
    assert limit_in_message(message) == stated


def test_a_limit_stated_in_a_429_message_is_adopted_and_held(clock):
    """No limit headers: the 429's "Limit 30" replaces the estimate its burst would give."""
    limiter = make(clock)
    grant_times(clock, limiter, [1] * 9)
    limiter.rate_limited(
        0.5, None, "Rate limit reached for m in organization o on images per min (IPM): Limit 30"
    )
    snap = limiter.snapshot()
    assert (snap["ipm_limit"], snap["ipm_estimate"], snap["rpm_limit"]) == (30, None, None)
    granted = grant_times(clock, limiter, [1] * 60)
    assert max_in_window(granted) <= 30
