"""The retry policy for one request, built from tenacity's public strategies.

What is retried is decided by the error class (see tasks/retry.py); this module decides
how long to wait and when to give up. 429 rate-limit answers sit outside the attempt
budget: they cost nothing and the limiter paces the run, so only the time budget bounds them.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable

import tenacity

from imagebatch.configs.settings import RetrySettings
from imagebatch.tasks.errors import AmbiguousError, ApiError, RateLimited, TransientError


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


class _Budgets:
    """The stop strategy: `max_attempts` attempts, not counting 429 rate-limit answers, and
    no sleep that would end past `max_total_seconds` from the first attempt.

    Remembers which attempt numbers were rate limited, so it gives the same answer however
    often tenacity asks about one attempt.
    """

    def __init__(self, max_attempts: int, max_total_seconds: float) -> None:
        self.max_attempts = max_attempts
        self.max_total_seconds = max_total_seconds
        self.rate_limited: set[int] = set()

    def __call__(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number == 1:  # a policy object reused for another request
            self.rate_limited.clear()
        if state.outcome is not None and isinstance(state.outcome.exception(), RateLimited):
            self.rate_limited.add(state.attempt_number)
        if state.attempt_number - len(self.rate_limited) >= self.max_attempts:
            return True
        # idle_for counts the sleeps, so an injected (instant) sleep is still budgeted.
        elapsed = max(state.seconds_since_start or 0.0, state.idle_for)
        return elapsed + state.upcoming_sleep > self.max_total_seconds


def retrying(
    settings: RetrySettings,
    *,
    on_retry: Callable[[ApiError, int, float], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> tenacity.AsyncRetrying:
    """A tenacity policy for one request: `async for attempt in retrying(s): with attempt: ...`.

    Retries what `is_retryable` allows, waits `retry_wait`, stops after `max_attempts` attempts
    (429 rate-limit answers do not count) or before a sleep that would end past
    `max_total_seconds` from the first attempt, and re-raises the last error (never
    tenacity.RetryError). `on_retry(error, attempt_number, wait)` runs before each sleep, where
    attempt_number is the attempt that just failed (1 for the first).
    """

    def wait(state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        value = retry_wait(error, state.attempt_number - 1, settings, rand) if error else None
        return 0.0 if value is None else value

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        if on_retry is not None and isinstance(error, ApiError):
            on_retry(error, state.attempt_number, state.upcoming_sleep)

    return tenacity.AsyncRetrying(
        sleep=sleep,
        retry=tenacity.retry_if_exception(lambda error: is_retryable(error, settings)),
        wait=wait,
        stop=_Budgets(settings.max_attempts, settings.max_total_seconds),
        before_sleep=before_sleep,
        reraise=True,
    )
