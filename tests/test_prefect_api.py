"""Which Prefect API a run uses, and that it says so: a configured server (credentials in its
URL never shown), a server started by `prefect server start --background` (found through its
PREFECT_HOME, on a port of this test's choosing, never one another suite may have started),
else Prefect's API served from the run's own process (no server subprocess, every task run in
PREFECT_HOME's database), else Prefect's own temporary API; each with a hint."""

from __future__ import annotations

import os
import sqlite3
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
IN_PROCESS = "no Prefect server found: serving Prefect's API from this process"
FALLBACK = "could not serve Prefect's API from this process"
SECRET = "sk-test-SECRET-in-process-api-0123456789"

# `imagebatch` as a user runs it, with Python's audit hook writing down every process it
# starts (subprocess, fork, spawn, exec: the program and its arguments) to the file named by
# argv[1]. With argv[2] == "no-uvicorn" this process cannot import uvicorn (a child process
# still can).
DRIVER = """
import sys
log = open(sys.argv[1], "a", encoding="utf-8")
def audit(event, args):
    if event in ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec"):
        log.write(f"{event} {args[:2]!r}\\n")
        log.flush()
sys.addaudithook(audit)
if sys.argv[2] == "no-uvicorn":
    sys.modules["uvicorn"] = None
sys.argv = ["imagebatch", *sys.argv[3:]]
from imagebatch.cli import main
main()
"""


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
    assert IN_PROCESS in again.stderr and HINT in again.stderr
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


def audited_run(
    tmp_path: Path, home: Path, sim, jobs: int, *, uvicorn: bool
) -> tuple[subprocess.CompletedProcess[str], str]:
    """`imagebatch run` of `jobs` jobs (one Prefect task each) against the simulator, with no
    Prefect server anywhere; its output and every process it started."""
    table = tmp_path / "jobs.csv"
    rows = "".join(f"mug {i},gpt-image-2\n" for i in range(jobs))
    table.write_text("prompt,model\n" + rows, encoding="utf-8")
    config = tmp_path / "per-job.toml"
    config.write_text('[flow]\ntask_per = "job"\n', encoding="utf-8")
    started = tmp_path / "started.txt"
    started.write_text("", encoding="utf-8")
    env = client_env(home, OPENAI_BASE_URL=sim.base_url, OPENAI_API_KEY=SECRET)
    argv = ["run", str(table), "--out", str(tmp_path / "out"), "-q", "--config", str(config)]
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(started), "uvicorn" if uvicorn else "no-uvicorn"] + argv,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, started.read_text(encoding="utf-8")


def recorded(database: Path) -> tuple[list[str], list[str], int]:
    """States of the flow runs and task runs in a Prefect database, and its number of logs."""
    with sqlite3.connect(database) as db:
        flows = [r[0] for r in db.execute("select state_type from flow_run")]
        tasks = [r[0] for r in db.execute("select state_type from task_run")]
        logs = db.execute("select count(*) from log").fetchone()[0]
    return flows, tasks, logs


def test_with_no_server_the_run_serves_prefects_api_itself_and_records_every_task(
    fresh_sim, tmp_path
):
    home = tmp_path / "home"
    done, started = audited_run(tmp_path, home, fresh_sim, 150, uvicorn=True)
    assert done.returncode == 0, done.stderr
    assert IN_PROCESS in done.stderr and HINT in done.stderr
    assert FALLBACK not in done.stderr
    assert "Traceback" not in done.stderr  # a clean exit: the server stopped without noise
    assert "uvicorn" not in started and "prefect" not in started  # no server subprocess
    # Prefect's ephemeral database, where `prefect server start` finds these runs: the flow
    # run and every job's task run, finished, written before the process ended.
    flows, tasks, logs = recorded(home / "prefect.db")
    assert flows == ["COMPLETED"]
    assert len(tasks) == 150 and set(tasks) == {"COMPLETED"}
    assert logs > 0
    assert SECRET.encode() not in (home / "prefect.db").read_bytes()


def test_when_the_api_cannot_be_served_in_process_prefects_own_temporary_api_runs(
    fresh_sim, tmp_path
):
    home = tmp_path / "home"
    done, started = audited_run(tmp_path, home, fresh_sim, 3, uvicorn=False)
    assert done.returncode == 0, done.stderr
    assert FALLBACK in done.stderr and "cannot import Prefect's server" in done.stderr
    assert HINT in done.stderr and IN_PROCESS not in done.stderr
    assert "uvicorn" in started  # Prefect's temporary server, a child process
    flows, _, _ = recorded(home / "prefect.db")
    assert flows == ["COMPLETED"]  # (its task runs: Prefect's server may drop some at exit)
