"""Prefect's API served from this process, for runs with no Prefect server to talk to.

Prefect's own ephemeral mode starts a uvicorn subprocess per process (about 200 MB and
seconds to start) and imports its server in the client anyway to do so. Here the same app
(`prefect.server.api.server.create_app(ephemeral=True)`: the API and the services Prefect
runs in ephemeral servers, no UI) runs under uvicorn in a daemon thread with its own event
loop, on a loopback socket bound here to port 0 and handed to uvicorn (no free-port race).
It uses the database Prefect's ephemeral mode would use ($PREFECT_HOME's SQLite unless
PREFECT_API_DATABASE_CONNECTION_URL says otherwise), so a later `prefect server start`
shows these runs. It starts once per process; at interpreter exit it lets the services take
what the run sent, then stops, within bounded times.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import gc
import socket
import threading
import time
from typing import Any

import httpx

# The task-run recorder writes one task run per transaction by default and falls behind a
# run of hundreds of tasks (Prefect's in-memory queue then drops records); 500 per batch
# keeps up. A default only: the user's own setting wins.
RECORDER_BATCH_SIZE = 500
# At exit: how long the services may take to empty Prefect's in-memory queues, and how
# long uvicorn and the services' shutdown may take after that.
DRAIN_SECONDS = 30.0
STOP_SECONDS = 10.0
# While the services drain: give up when the backlog has not shrunk for this long (a
# message no consumer takes must not hold the exit for DRAIN_SECONDS).
STALL_SECONDS = 2.0
SETTLE_SECONDS = 0.2
POLL_SECONDS = 0.05


class NotServed(Exception):
    """Why Prefect's API could not be served from this process (a short phrase)."""


_lock = threading.Lock()
_server: _Server | None = None
_failure: str | None = None


def serve() -> str:
    """The API URL of this process's Prefect API, started by the first call.

    Raises NotServed (then and on every later call) when it cannot start."""
    global _server, _failure
    with _lock:
        if _failure is not None:
            raise NotServed(_failure)
        if _server is None:
            server = _Server()
            try:
                server.start()
            except NotServed as exc:
                _failure = str(exc)
                raise
            _at_exit(server.stop)
            _server = server
        if not _server.alive():
            raise NotServed("its server thread has stopped")
        return _server.url


def _at_exit(stop: Any) -> None:
    """Run `stop` at interpreter exit, after Prefect's client has sent what it holds and
    before the interpreter shuts its thread pools.

    Plain `atexit` is too late: by then `concurrent.futures` refuses new work and the
    server's shutdown (its database sessions) waits forever. Prefect's client services
    (events, logs) register their own drain with `threading._register_atexit` when they
    start, which is after this server started, and those run in reverse order: the client
    drains first, then this stops, then the thread pools close. The same (private, stable
    since Python 3.9) hook Prefect uses; plain `atexit` where it is missing."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        atexit.register(stop)
    else:
        register(stop)


def served() -> str | None:
    """The API URL of this process's running Prefect API, or None when none was started."""
    server = _server
    return server.url if server is not None and server.alive() else None


class _Server:
    """Prefect's API app under uvicorn in a daemon thread of this process."""

    def __init__(self) -> None:
        self.url = ""
        self.uvicorn: Any = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        from prefect.settings import get_current_settings

        timeout = float(get_current_settings().server.ephemeral.startup_timeout_seconds)
        try:
            import uvicorn
            from prefect.server.api.server import create_app
        except ImportError as exc:
            raise NotServed(f"cannot import Prefect's server: {exc}") from None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
        except OSError as exc:
            sock.close()
            raise NotServed(f"cannot bind a loopback port: {exc.strerror or exc}") from None
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
        # The caller's settings (its PREFECT_HOME, database, profile) go with the thread.
        context = contextvars.copy_context()
        self.thread = threading.Thread(
            target=context.run,
            args=(self._run, sock, create_app, uvicorn),
            name="imagebatch-prefect-api",
            daemon=True,  # never waited for by the interpreter: stop() ends it at exit
        )
        self.thread.start()
        self._wait_healthy(timeout)

    def _run(self, sock: socket.socket, create_app: Any, uvicorn: Any) -> None:
        from prefect.settings import temporary_settings

        defaults = {"server.services.task_run_recorder.batch_size": RECORDER_BATCH_SIZE}
        try:
            with temporary_settings(set_defaults=defaults):
                app = create_app(ephemeral=True, final=True)
                config = uvicorn.Config(
                    app,
                    log_config=None,  # the process's logging stays the caller's
                    log_level="error",
                    access_log=False,
                    lifespan="on",
                    timeout_graceful_shutdown=int(STOP_SECONDS / 2),
                )
                self.uvicorn = uvicorn.Server(config)
                asyncio.run(self.uvicorn.serve(sockets=[sock]))
        except BaseException as exc:  # reported by start() or ignored at exit
            self.error = exc
        finally:
            sock.close()

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # A server on loopback: never through an HTTP proxy from the environment.
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while True:
                if not self.alive():
                    why = f": {type(self.error).__name__}: {self.error}" if self.error else ""
                    raise NotServed(f"its server stopped while starting{why}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop(drain=False)
                    raise NotServed(f"not healthy within {timeout:g} s")
                time.sleep(POLL_SECONDS)

    def stop(self, drain: bool = True) -> None:
        """Let the services take what was sent, stop uvicorn (and with it the services, which
        write what they hold) and wait for the thread, each within a bounded time."""
        if not self.alive() or self.uvicorn is None:
            return
        try:
            if drain:
                _drain(DRAIN_SECONDS)
            self.uvicorn.should_exit = True
            assert self.thread is not None
            self.thread.join(STOP_SECONDS)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C at exit: stop waiting, the daemon thread ends with us
        if drain:
            # At exit: the interpreter's last garbage collections over the server's objects
            # (app, routes, models, engine) took seconds on a busy machine (about 6 s against
            # 0.3 s with this); nothing left needs them to run finalizers.
            gc.freeze()


def _drain(timeout: float) -> None:
    """Wait until Prefect's in-memory message queues stay empty for SETTLE_SECONDS (what the
    client sent last may still be on its way through the socket), or stop shrinking."""
    deadline = time.monotonic() + timeout
    least, progress = _backlog(), time.monotonic()
    empty_since: float | None = None
    while time.monotonic() < deadline:
        now, backlog = time.monotonic(), _backlog()
        if backlog == 0:
            empty_since = now if empty_since is None else empty_since
            if now - empty_since >= SETTLE_SECONDS:
                return
        else:
            empty_since = None
            if backlog < least:
                least, progress = backlog, now
            elif now - progress > STALL_SECONDS:
                return
        time.sleep(POLL_SECONDS)


def _backlog() -> int:
    """Messages published to Prefect's in-memory topics and not yet consumed (Prefect keeps
    these counts for its own metrics log), 0 when they cannot be read."""
    try:
        from prefect.server.utilities.messaging.memory import METRICS
    except ImportError:
        return 0
    try:
        return sum(max(0, m["published"] - m["consumed"]) for m in list(METRICS.values()))
    except (KeyError, TypeError):
        return 0
