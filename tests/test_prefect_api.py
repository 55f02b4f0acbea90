"""Which Prefect API a run uses, and that it says so: a configured server (credentials in its
URL never shown), a server started by `prefect server start --background` (found through its
PREFECT_HOME, on a port of this test's choosing, never one another suite may have started),
else the temporary API with a hint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port, healthy, wait_for

from imagebatch.flows.prefect_api import background_server

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HINT = "`prefect server start --background` makes later runs start in about 2 s"


def client_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    )
    env.update(extra)
    return env


def run_cli(tmp_path: Path, env: dict[str, str], out: str) -> subprocess.CompletedProcess[str]:
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("prompt,model\na red mug,gpt-image-2\n", encoding="utf-8")
    return subprocess.run(
        [str(BIN / "imagebatch"), "run", str(jobs), "--out", str(tmp_path / out), "-q"]
        + ["--simulate"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def prefect(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "prefect"), *args],
        env=client_env(home, PREFECT_UI_ENABLED="false", PREFECT_SERVER_LOGGING_LEVEL="WARNING"),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def background(tmp_path: Path):
    """`prefect server start --background` in its own PREFECT_HOME on a free port; stopped
    (and its process gone) at the end, whatever the test did."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    started = prefect(home, "server", "start", "--background", "--port", str(port))
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int((home / "server.pid").read_text())
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: healthy(url), 180, "the background server to be healthy", every=0.5)
        yield home, url
    finally:
        prefect(home, "server", "stop")
        _gone(pid)


def _gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)


def test_a_run_uses_a_background_server_says_so_and_the_temporary_api_after_it_stops(
    background, tmp_path
):
    home, url = background
    done = run_cli(tmp_path, client_env(home), "first")
    assert done.returncode == 0, done.stderr
    assert f"using the Prefect server at {url}" in done.stderr
    assert HINT not in done.stderr
    runs = httpx.post(f"{url}/flow_runs/filter", json={}, timeout=30).json()
    assert [r["state_type"] for r in runs] == ["COMPLETED"]  # the run was recorded there

    stopped = prefect(home, "server", "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    again = run_cli(tmp_path, client_env(home), "second")
    assert again.returncode == 0, again.stderr
    assert "using the Prefect server" not in again.stderr
    assert HINT in again.stderr
    assert (tmp_path / "second" / "manifest.csv").is_file()


def test_a_configured_server_is_named_without_the_credentials_in_its_url(prefect_api, tmp_path):
    host = prefect_api.split("://", 1)[1]
    secret_url = f"http://imagebatch:{'pass' + 'word-xyz'}@{host}"
    done = run_cli(tmp_path, client_env(tmp_path / "home", PREFECT_API_URL=secret_url), "out")
    assert done.returncode == 0, done.stderr
    assert f"using the Prefect server at http://[redacted]@{host}" in done.stderr
    assert "password-xyz" not in done.stderr + done.stdout
    assert HINT not in done.stderr


def test_no_server_without_a_live_process_and_a_healthy_answer(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()  # nothing listens there
    assert background_server(home, "127.0.0.1", port) is None  # no pid file
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (home / "server.pid").write_text(str(dead.pid))
    assert background_server(home, "127.0.0.1", port) is None  # a stale pid file
    (home / "server.pid").write_text(str(os.getpid()))
    assert background_server(home, "127.0.0.1", port) is None  # alive, but no API answers
    (home / "server.pid").write_text("garbage")
    assert background_server(home, "127.0.0.1", port) is None
