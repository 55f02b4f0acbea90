"""Stopping a run that is not in the main thread.

Signal handlers can only be installed in the main thread, so a run inside a notebook kernel
(whose loop already runs there) executes in a worker thread and never sees SIGINT. The
kernel's interrupt arrives as KeyboardInterrupt in the caller instead; the caller presses
this switch, and the flow's loop gets the same first/second Ctrl-C handling as the CLI.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable


class StopSwitch:
    """A thread-safe way to press Ctrl-C for a run whose loop lives in another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._target: tuple[asyncio.AbstractEventLoop, Callable[[], None]] | None = None
        self._pending = 0

    def attach(self, loop: asyncio.AbstractEventLoop, on_press: Callable[[], None]) -> None:
        """Called by the flow: presses made before it started are delivered now."""
        with self._lock:
            self._target = (loop, on_press)
            pending, self._pending = self._pending, 0
        for _ in range(pending):
            loop.call_soon_threadsafe(on_press)

    def detach(self) -> None:
        with self._lock:
            self._target = None

    def press(self) -> None:
        with self._lock:
            target = self._target
            if target is None:
                self._pending += 1
                return
        loop, on_press = target
        try:
            loop.call_soon_threadsafe(on_press)
        except RuntimeError:  # the loop already closed: the run is over
            pass


current_switch: contextvars.ContextVar[StopSwitch | None] = contextvars.ContextVar(
    "imagebatch_stop_switch", default=None
)
