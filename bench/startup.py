"""Start-up wall times of the CLI (issue 13): commands that send nothing, and the example run
with each Prefect API a run can use. Several runs each, median reported; nothing asserts.

    python bench/startup.py                 # ~4 min on an idle 2-core machine
    python bench/startup.py --runs 9 --record

Modes of `imagebatch run data/catalog.csv --simulate`:
  ephemeral-fresh  no server: the run serves Prefect's API from its own process (before
                   flows/prefect_inprocess.py: Prefect's temporary server subprocess), a
                   new PREFECT_HOME each run (first use)
  ephemeral-warm   the same, one PREFECT_HOME already migrated
  background       a server from `prefect server start --background` in its own
                   PREFECT_HOME on a free port, found by the run (no PREFECT_API_URL)
Every run writes into a new output folder, so each is a whole run, not a resume.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "RESULTS.md"
EXAMPLE = ROOT / "data" / "catalog.csv"


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def wall(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall and CPU seconds (user + system, the process and the children it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=600)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, done.returncode


Measured = tuple[list[float], list[float], set[int], list[float]]


def measure(cmd: list[str], home_of_run, runs: int) -> Measured:
    """Wall, CPU and exit status of each run; for `imagebatch run`, also the wall time outside
    the run's own work (wall minus run.json's `seconds`, which start inside the flow)."""
    times, cpus, codes, outside = [], [], set(), []
    for i in range(runs):
        args = [c.replace("{i}", str(i)) for c in cmd]
        seconds, cpu, code = wall(args, env_for(home_of_run(i)))
        times.append(seconds)
        cpus.append(cpu)
        codes.add(code)
        if "--out" in args:
            run_json = Path(args[args.index("--out") + 1]) / "run.json"
            outside.append(seconds - json.loads(run_json.read_text())["seconds"])
    return times, cpus, codes, outside


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_background(home: Path) -> str:
    port = free_port()
    subprocess.run(
        [str(BIN / "prefect"), "server", "start", "--background", "--port", str(port)],
        env=env_for(home),
        check=True,
        capture_output=True,
        timeout=120,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the background server did not become healthy")


def stop_background(home: Path) -> None:
    subprocess.run(
        [str(BIN / "prefect"), "server", "stop"],
        env=env_for(home),
        capture_output=True,
        timeout=120,
    )


def row(name: str, cmd: list[str], measured: Measured) -> str:
    times, cpus, codes, outside = measured
    around = f"{statistics.median(outside):.2f}" if outside else "-"
    shown = " ".join(cmd).replace(str(BIN) + "/", "").replace(str(ROOT) + "/", "")
    spread = ", ".join(f"{t:.2f}" for t in times)
    return (
        f"| {name} | `{shown}` | {statistics.median(times):.2f} | {min(times):.2f} | "
        f"{max(times):.2f} | {spread} | {statistics.median(cpus):.2f} | {around} | "
        f"{', '.join(map(str, sorted(codes)))} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per command (default 5)")
    ap.add_argument("--run-runs", type=int, default=3, help="runs per run mode (default 3)")
    ap.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imagebatch-startup-"))
    ib = str(BIN / "imagebatch")
    quick = {
        "--help": [ib, "--help"],
        "run --help": [ib, "run", "--help"],
        "models": [ib, "models"],
        "validate (example)": [ib, "validate", str(EXAMPLE)],
    }
    lines = []
    warm = work / "home-warm"
    for name, cmd in quick.items():
        lines.append(row(name, cmd, measure(cmd, lambda i: warm, args.runs)))
        print(lines[-1], flush=True)

    def run(out: str) -> list[str]:
        return [ib, "run", str(EXAMPLE), "--simulate", "-q", "--out", str(work / out)]

    wall(run("warmup"), env_for(warm))  # migrates the warm home's database
    background = work / "home-background"
    background.mkdir()
    modes = [
        (
            "run, no server (in-process API), fresh PREFECT_HOME",
            "fresh",
            lambda i: work / f"home-{i}",
        ),
        ("run, no server (in-process API), warm PREFECT_HOME", "warm", lambda i: warm),
        ("run, `prefect server start --background` up", "server", lambda i: background),
    ]
    try:
        start_background(background)
        for name, slug, home_of in modes:
            measured = measure(run(f"{slug}-{{i}}"), home_of, args.run_runs)
            lines.append(row(name, run("OUT")[:-1] + ["OUT"], measured))
            print(lines[-1], flush=True)
    finally:
        stop_background(background)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    load = os.getloadavg()[0]
    header = [
        "",
        "## Start-up (issue 13)",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; commit: `{commit}`; command: "
        f"`python bench/startup.py --runs {args.runs} --run-runs {args.run_runs}`; "
        f"load average at the end: {load:.1f} (2 cores)",
        "- seconds: wall time of the whole process, and its CPU time (user + system, with the "
        "children it waited for: a temporary API server, if any); exit status 1 for the example "
        "is its one invalid row; *outside the run*: wall minus run.json's `seconds` (which "
        "start when the flow begins its work): imports, Prefect's API, the flow run's "
        "creation and the exit",
        "",
        "| what | command | wall median | min | max | all runs | CPU median | outside the run "
        "(median) | exit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table = "\n".join(header + lines) + "\n"
    print(table)
    if args.record:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(table)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
