"""Running a flow from any caller: a script, a notebook kernel, or async code.

Jupyter, IPython and VS Code notebooks already run an event loop in the main thread, where
`asyncio.run` is refused and signal handlers must not be replaced. So when a loop is running,
the run happens in a worker thread with its own loop and a copy of the caller's context
(Prefect settings, the kernel's output routing); the caller's loop is never touched. The
folder lock is taken in that thread, the kernel's interrupt (KeyboardInterrupt in the caller)
is passed on to the run as Ctrl-C, and the Prefect API a run serves from this process (no
server configured), started once per process, serves every later call.
"""

from __future__ import annotations

import asyncio
import contextvars
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from imagebatch.flows.control import StopSwitch, current_switch

T = TypeVar("T")


def loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def call_blocking(call: Callable[[], T]) -> T:
    """`call()` here when no loop runs in this thread, else in a worker thread (waited for)."""
    if not loop_running():
        return call()
    switch, ctx = _run_context()
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["result"] = ctx.run(_in_worker, call)
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name="imagebatch-run", daemon=True).start()
    # Not Thread.join: interrupted by KeyboardInterrupt it can report a live thread as done.
    while not done.is_set():
        try:
            done.wait(0.5)
        except KeyboardInterrupt:
            # First interrupt: finish requests in flight; a second one abandons them.
            switch.press()
    if "error" in box:
        raise box["error"]
    return box["result"]


async def call_async(call: Callable[[], T]) -> T:
    """Await `call()` run in a worker thread; cancelling the awaiting task stops the run."""
    switch, ctx = _run_context()
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = ctx.run(_in_worker, call)
        except BaseException as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the caller's loop is gone: nobody is waiting any more
            pass

    # Its own thread, not the loop's executor: the thread's signal mask is changed below.
    threading.Thread(target=target, name="imagebatch-run", daemon=True).start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        switch.press()  # as Ctrl-C: the run finishes requests in flight and writes its manifest
        await asyncio.wait([future])
        raise


def _run_context() -> tuple[StopSwitch, contextvars.Context]:
    switch = StopSwitch()
    ctx = contextvars.copy_context()
    ctx.run(current_switch.set, switch)
    return switch, ctx


def _in_worker(call: Callable[[], T]) -> T:
    """The worker thread's side: SIGINT blocked, then the call as a top-level flow run.

    Jupyter interrupts a kernel by signalling its whole process group, which includes
    Prefect's temporary API server where a run started one (when Prefect's API cannot be
    served from this process: flows/prefect_inprocess.py). Processes inherit the signal
    mask of the thread that starts them, so blocking SIGINT here (the kernel's main thread
    still receives it and presses the run's stop switch) keeps that server alive through an
    interrupt. Prefect stops it at exit with SIGTERM, which is not blocked.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    return _isolated(call)


def _isolated(call: Callable[[], T]) -> T:
    """Run `call` as a new top-level Prefect flow run, not as a child of the caller's run.

    The caller's run context (a notebook cell inside a flow) holds a client bound to the
    caller's loop, which this thread's loop cannot use.
    """
    from prefect.context import FlowRunContext, TaskRunContext

    FlowRunContext.__var__.set(None)  # type: ignore[arg-type]
    TaskRunContext.__var__.set(None)  # type: ignore[arg-type]
    return call()
