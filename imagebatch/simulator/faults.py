"""Fault injection: which fault a request gets, and the broken answers (500/503, drops, bad bodies).

Faults are drawn from the config's rates with the state's seeded RNG, so a seed replays a run.
"""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .config import SimConfig
from .failures import ApiFailure, json_bytes

FAULTS = ("error", "stall", "drop", "malformed")


def pick_fault(config: SimConfig, u: float) -> str | None:
    """The fault for uniform draw `u`: each fault owns a slice of [0, 1) as wide as its rate."""
    edge = 0.0
    for name in FAULTS:
        edge += getattr(config, f"{name}_rate")
        if u < edge:
            return name
    return None


def server_error(u2: float, overload_status: int = 503) -> ApiFailure:
    """An injected 500 or an overload (half each), the overload as a 503 or, as some servers
    send it, a 429 that is not a rate limit."""
    if overload_status == 429 and u2 >= 0.5:
        return ApiFailure(
            429,
            "The engine is currently overloaded, please try again later.",
            "server_error",
            None,
            "engine_overloaded",
        )
    if u2 < 0.5:
        return ApiFailure(
            500,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
        )
    return ApiFailure(
        503,
        "The engine is currently overloaded, please try again later.",
        "server_error",
        None,
        "server_overloaded",
    )


def malformed_response(u2: float) -> Response:
    """A 200 whose body is truncated JSON or JSON without `data` (half each)."""
    created = int(time.time())
    if u2 < 0.5:
        body = json_bytes({"created": created, "data": [{"b64_json": "iVBORw0KGgoAAAANSUhEUgAA"}]})
        body = body[: len(body) // 2]  # truncated JSON
    else:
        body = json_bytes({"created": created})  # valid JSON without data
    return Response(body, 200, media_type="application/json")


class Silent(Response):
    """The client has gone away: send nothing."""

    def __init__(self) -> None:
        super().__init__(status_code=499)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


class Drop(Response):
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


async def sleep_unless_disconnected(request: Request, seconds: float) -> bool:
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
