"""Shared fixtures: one real Prefect API per test session, simulators on loopback."""

from __future__ import annotations

import os

from imagebatch.cli import PREFECT_DEFAULTS

# Before Prefect is imported anywhere: quiet and offline, as the command line sets it.
for _name, _value in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
# A session's own Prefect home: a server someone started with `prefect server start
# --background` in ~/.prefect is never what a test's run talks to (runs look for one there).
if "PREFECT_HOME" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="imagebatch-tests-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
for _key in (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "IMAGEBATCH_MODELS",
    "OPENAI_API_VERSION",
    "AZURE_OPENAI_ENDPOINT",
    "AZURE_OPENAI_API_KEY",
    "IMAGEBATCH_PRICES",
):
    os.environ.pop(_key, None)

import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
from helpers import healthy, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """A real Prefect API server for the whole session (starting one costs ~10 s)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


class PrefectServer:
    """A `prefect server start` subprocess: its URL, its home and its SQLite database."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = 0  # the server picks a free one and says which (see `reported_port`)
        self.database = home / "prefect.db"
        self.log = home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def reported_port(self) -> int | None:
        """The port uvicorn bound, from its start-up line in the log (None until then)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", text)
        return int(found.group(1)) if found else None

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client, worker or `serve` process talking to this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_API_URL=self.url,
            PREFECT_HOME=str(self.home / "client"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING",
        )
        env.update(extra)
        return env

    def get(self, path: str, **kw: Any) -> Any:
        reply = httpx.get(f"{self.url}{path}", timeout=30, **kw)
        reply.raise_for_status()
        return reply.json()

    def post(self, path: str, body: Any) -> Any:
        reply = httpx.post(f"{self.url}{path}", json=body, timeout=30)
        reply.raise_for_status()
        return reply.json()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real Prefect server (SQLite, loopback) in a temporary PREFECT_HOME, for schedules,
    deployments and workers, which the test harness's API cannot serve."""
    home = tmp_path_factory.mktemp("prefect-home")
    server = PrefectServer(home)
    env = server.env(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{server.database}",
        # INFO: uvicorn's "running on" line says which port `--port 0` bound. A port found
        # free and closed before the server binds it could be taken in between.
        PREFECT_SERVER_LOGGING_LEVEL="INFO",
        PREFECT_UI_ENABLED="false",
        # Record task runs in batches (see shared/reference/prefect-notes.md).
        PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE="500",
    )
    env.pop("PREFECT_API_URL")
    log = server.log.open("wb")
    server.proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("prefect")),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        server.port = wait_for(
            server.reported_port, 180, "the prefect server's port", server.proc, server.log
        )
        wait_for(
            lambda: healthy(server.url),
            180,
            "the prefect server to be healthy",
            server.proc,
            server.log,
            every=0.5,
        )
        yield server
    finally:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=30)
        log.close()


@pytest.fixture
def procs():
    """Subprocesses a test starts (it appends them), stopped at teardown if still alive: one
    started in its own session (a worker, `serve`) is asked to stop with its whole process
    group (SIGTERM, then SIGKILL after 30 s); any other is killed at once."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is not None:
            continue
        try:
            own_group = os.getpgid(p.pid) == p.pid
        except ProcessLookupError:
            continue
        if not own_group:
            p.kill()
            p.wait(10)
            continue
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)


@pytest.fixture(scope="module")
def sim():
    """A fast simulator shared by a test module (modules that need another define their own)."""
    from imagebatch.simulator import SimConfig, SimulatorServer

    with SimulatorServer(SimConfig(latency=0.01)) as server:
        yield server


@pytest.fixture
def fresh_sim(sim):
    """The module's simulator, reset to its start-up settings and counts."""
    from imagebatch.simulator import SimConfig

    sim.reset()
    sim.configure(**SimConfig(latency=0.01).to_dict(redact=False))
    return sim
