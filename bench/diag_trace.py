"""Diagnostic only: the imagebatch CLI with a timeline of limiter grants, 429s and event-loop lag.

    BENCH_TRACE=trace.jsonl python bench/diag_trace.py run JOBS.csv --out DIR -q

Wraps, in this process only, `Limiter._grant` (each grant: time, in flight, slow-start cap),
`Limiter.rate_limited` (each 429 the client processes), `ImagesClient.send` (start and end
of each request with its status) and starts a task in the flow's event loop that measures
how late a 20 ms sleep wakes up (loop lag). Behaviour is unchanged; the package is not
modified. Used by `run_bench.py diag429` to explain the burst of 429s when the limit is
unknown.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import imagebatch.flows.run_jobs as run_jobs_module
from imagebatch.tasks.api_client import ImagesClient
from imagebatch.tasks.errors import ApiError
from imagebatch.tasks.limiter import Limiter

_out = open(os.environ.get("BENCH_TRACE", "trace.jsonl"), "w", buffering=1)


def _emit(**event) -> None:
    event["t"] = time.time()
    _out.write(json.dumps(event) + "\n")


_grant = Limiter._grant


def _traced_grant(self, *args):
    permit = _grant(self, *args)
    _emit(ev="grant", in_flight=self._in_flight, cap=self._cap(), slow_cap=round(self._slow_cap, 1))
    return permit


_rate_limited = Limiter.rate_limited


def _traced_rate_limited(self, retry_after, headers=None):
    _rate_limited(self, retry_after, headers)
    _emit(
        ev="429", retry_after=retry_after, estimate=self._images.estimate, in_flight=self._in_flight
    )


_send = ImagesClient.send


async def _traced_send(self, *args):
    started = time.time()
    try:
        result = await _send(self, *args)
    except ApiError as error:
        _emit(ev="answer", status=error.status, started=started)
        raise
    _emit(ev="answer", status=200, started=started)
    return result


Limiter._grant = _traced_grant
Limiter.rate_limited = _traced_rate_limited
ImagesClient.send = _traced_send

_run = run_jobs_module._FanOut.run


async def _lag_monitor() -> None:
    while True:
        t = time.perf_counter()
        await asyncio.sleep(0.02)
        _emit(ev="lag", ms=round((time.perf_counter() - t - 0.02) * 1000, 2))


async def _traced_run(self, work):
    monitor = asyncio.ensure_future(_lag_monitor())
    try:
        return await _run(self, work)
    finally:
        monitor.cancel()


run_jobs_module._FanOut.run = _traced_run

from imagebatch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
