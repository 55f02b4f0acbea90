"""Run the simulator: in a background thread (tests, in-process runs) or in the foreground (CLI)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import uvicorn

from imagebatch.configs.registry import Registry

from .app import Simulator, create_app
from .config import SimConfig

T = TypeVar("T")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets whose proto
    # says TCP, and without it every keep-alive response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _uvicorn_config(app: Any, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level=log_level,
        log_config=None,  # leave the host process's logging setup alone
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
        timeout_keep_alive=30,
        backlog=2048,
    )


class SimulatorServer:
    """The simulator on a loopback port, served by uvicorn in a daemon thread with its own loop.

        with SimulatorServer(SimConfig(latency=0.01)) as sim:
            client = OpenAI(base_url=sim.base_url, api_key="sk-test")

    `config` is the live object the app reads: `sim.config.update(ipm=5)` or
    `sim.configure(ipm=5)` changes behaviour for the next request.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        registry: Registry | None = None,
        log_level: str = "warning",
    ) -> None:
        self.config = config if config is not None else SimConfig()
        self.host = host
        self.port = port
        self.log_level = log_level
        self.app = create_app(self.config, registry)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def simulator(self) -> Simulator:
        return self.app.state.simulator

    @property
    def url(self) -> str:
        """Root URL, e.g. http://127.0.0.1:54321"""
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. http://127.0.0.1:54321/v1"""
        return f"{self.url}/v1"

    @property
    def running(self) -> bool:
        return (
            self._thread is not None
            and self._thread.is_alive()
            and bool(self._server and self._server.started)
        )

    def start(self, timeout: float = 15.0) -> SimulatorServer:
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        self._sock = _bind(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        self._server = uvicorn.Server(_uvicorn_config(self.app, self.log_level))
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                assert self._server is not None
                task = asyncio.ensure_future(self._server.serve(sockets=[self._sock]))  # type: ignore[list-item]
                while not self._server.started and not task.done():  # noqa: ASYNC110 (uvicorn has no started event)
                    await asyncio.sleep(0.005)
                ready.set()
                await task

            try:
                asyncio.run(main())
            except BaseException as exc:  # pragma: no cover - reported by start()
                self._error = exc
            finally:
                ready.set()

        self._thread = threading.Thread(
            target=run, name=f"imagebatch-simulator:{self.port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout) or not self._server.started:
            self.stop()
            raise RuntimeError(f"simulator did not start on {self.url}: {self._error!r}")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving. Open connections are cut first, so in-flight (e.g. stalled) requests end
        at once: their clients see a dropped connection, as when a real server goes away."""
        server, thread, loop = self._server, self._thread, self._loop
        if server is not None and loop is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._abort_connections(server), loop).result(2)
            except Exception:  # pragma: no cover - the loop is already going down
                pass
        if server is not None:
            server.should_exit = True
        if thread is not None and thread is not threading.current_thread():
            thread.join(min(2.0, timeout))
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        batches = getattr(self.app.state, "batches", None)
        if batches is not None:
            batches.close()  # its files live in a temporary folder
        self._thread = None
        self._server = None
        self._loop = None
        self._sock = None

    @staticmethod
    async def _abort_connections(server: uvicorn.Server) -> None:
        for connection in list(server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        for _ in range(3):  # let handlers see the disconnect and return
            await asyncio.sleep(0)

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ control (thread-safe)
    def _call(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None or not loop.is_running():
            return fn()

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(10)

    def stats(self) -> dict[str, Any]:
        """Same as GET /v1/_sim/stats."""
        return self._call(self.simulator.snapshot)

    def reset(self) -> None:
        """Same as POST /v1/_sim/reset: clears stats, rate windows and quota use."""
        self._call(self.simulator.state.reset)

    def configure(self, data: dict[str, Any] | None = None, **knobs: Any) -> SimConfig:
        """Same as POST /v1/_sim/config."""

        def apply() -> SimConfig:
            self.config.update(data, **knobs)
            self.simulator.state.sync()
            return self.config

        return self._call(apply)


def serve_forever(
    config: SimConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    registry: Registry | None = None,
    log_level: str = "warning",
    announce: Callable[[str], None] | None = print,
) -> None:
    """Serve in the foreground until SIGINT/SIGTERM. Port 0 picks a free port.

    Once accepting connections, calls `announce("imagebatch simulator listening on <base_url>")`
    (printed and flushed by default) so a parent process can read the port.
    """
    app = create_app(config if config is not None else SimConfig(), registry)
    sock = _bind(host, port)
    real_port = sock.getsockname()[1]
    base_url = f"http://{_url_host(host)}:{real_port}/v1"
    server = uvicorn.Server(_uvicorn_config(app, log_level))
    if logging.getLogger().handlers == [] and log_level:
        logging.basicConfig(
            level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )

    async def main() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn has no started event)
            await asyncio.sleep(0.005)
        if server.started and announce is not None:
            if announce is print:
                print(f"imagebatch simulator listening on {base_url}", flush=True)
            else:
                announce(f"imagebatch simulator listening on {base_url}")
        await task

    try:
        asyncio.run(main())
    finally:
        sock.close()
