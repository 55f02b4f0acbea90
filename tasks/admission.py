"""Admission: how many jobs are started and not yet finished, kept near the limiter's cap.

The limiter gates requests; this gates jobs one step before it, so a job starts (and shows
as Running in Prefect) only when its requests can go out soon, and a stop leaves the rest
unstarted. Jobs are counted one by one as they start and end, whichever Prefect task
carries them: one task per job, or a chunk task whose jobs start one after another as room
frees. The next chunk starts as soon as the jobs of running chunks all started and the open
ones fit, so the requests in flight stay at the cap across chunk edges.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Admission:
    """Open jobs at most the in-flight cap plus some slack: a few ready jobs wait in the
    limiter's queue, so a finished request is replaced at once."""

    MIN_SLACK = 2
    SLACK_FRACTION = 4  # slack: a quarter of the cap

    def __init__(self, cap: Callable[[], int], stop: asyncio.Event) -> None:
        self._cap = cap
        self._stop = stop
        self._changed = asyncio.Event()
        self.open = 0  # jobs started, not yet finished
        self.admitted = 0  # jobs that passed the gate (or were let through by a stop)

    @property
    def limit(self) -> int:
        cap = self._cap()
        return cap + max(self.MIN_SLACK, cap // self.SLACK_FRACTION)

    def has_room(self) -> bool:
        return self.open < self.limit

    async def wait(self, ready: Callable[[], bool]) -> bool:
        """Wait until `ready()`; False (at once) when the run is stopping."""
        while not self._stop.is_set() and not ready():
            self._changed.clear()
            await self._changed.wait()
        return not self._stop.is_set()

    async def enter(self) -> bool:
        """Wait for room and count one job as started; False (not counted) when stopping."""
        admitted = await self.wait(self.has_room)
        self.admitted += 1
        if admitted:
            self.open += 1
            self._changed.set()
        return admitted

    def leave(self) -> None:
        """A job that `enter` admitted has ended: room for the next one."""
        self.open -= 1
        self._changed.set()

    def wake(self) -> None:
        """Let waiters look again (the run was told to stop)."""
        self._changed.set()
