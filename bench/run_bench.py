"""imagebatch benchmarks against the simulator on loopback. One command per benchmark:

    /tmp/venv/bin/python bench/run_bench.py overhead|faults|memory|fidelity|unknown|naive|all [options]

Every process under test is a separate OS process: the simulator (`python -m
imagebatch.simulator`, or bench/sim_noheaders.py), one `prefect server start` shared by the
invocation, and the client (`python -m imagebatch.cli run ...` or bench/naive.py). The
driver polls the simulator's /v1/_sim/stats and the processes' CPU and RSS (psutil) every
second, reaps the client with os.wait4 for its exact user+sys CPU and peak RSS, then prints a
table and appends it to bench/RESULTS.md with the command, date and git commit.

Nothing here asserts on time: the targets are printed beside the numbers, marked ok/MISS.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PY = sys.executable
RESULTS = BENCH / "RESULTS.md"
API_KEY = "sk-bench"

# ------------------------------------------------------------------------------------ helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        # "+dirty": the code under test (anything outside bench/) differs from the commit
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def tree_cpu(proc: psutil.Process | None) -> float:
    """user+sys seconds of a process and its live children (0 if gone)."""
    if proc is None:
        return 0.0
    total = 0.0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def tree_rss(proc: psutil.Process | None) -> int:
    if proc is None:
        return 0
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def system_busy() -> float:
    """CPU seconds (all cores) the whole machine has spent not idle."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def make_jobs(
    path: Path, n: int, *, model: str = "gpt-image-2", size: str = "1024x1024", prompts: int = 256
) -> Path:
    """n single-image jobs with unique ids; prompts cycle over a pool so the simulator's render
    cache (512 entries) keeps its CPU low and the same for every client."""
    subjects = ["lighthouse", "teapot", "fox", "bicycle", "orchid", "robot", "sailboat", "owl"]
    styles = ["watercolor", "studio photo", "pixel art", "ink sketch"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "model", "size"])
        for i in range(n):
            k = i % prompts
            prompt = f"a {styles[k % 4]} of a {subjects[(k // 4) % 8]}, variant {k}"
            w.writerow([f"job-{i:05d}", prompt, model, size])
    return path


# ------------------------------------------------------------------------------------ processes


def stop_server(proc: subprocess.Popen, errlog: Any) -> None:
    """Ctrl-C a server we started, kill it if it lingers, close its log."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    errlog.close()


class Simulator:
    def __init__(
        self, workdir: Path, *flags: str, no_headers: bool = False, name: str = "sim"
    ) -> None:
        if no_headers:
            cmd = [PY, str(BENCH / "sim_noheaders.py")]
        else:
            cmd = [PY, "-m", "imagebatch.simulator"]
        cmd += ["--port", "0", *flags]
        self.cmd = cmd
        self.flags = list(flags)
        self.no_headers = no_headers
        self.errlog = open(workdir / f"{name}.stderr.log", "w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.errlog,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.base_url = self._wait_listening()
        self.ps = psutil.Process(self.proc.pid)
        self.http = httpx.Client(timeout=10)

    def _wait_listening(self, timeout: float = 30.0) -> str:
        deadline = time.time() + timeout
        assert self.proc.stdout is not None
        while time.time() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    break
                if "listening on" in line:
                    threading.Thread(target=self._drain, daemon=True).start()
                    return line.strip().rsplit(" ", 1)[-1]
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"simulator did not start: {shlex.join(self.cmd)}")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def describe(self) -> str:
        what = "bench/sim_noheaders.py" if self.no_headers else "python -m imagebatch.simulator"
        return f"{what} {' '.join(self.flags)}"

    def stats(self) -> dict[str, Any]:
        return self.http.get(self.base_url + "/_sim/stats").json()

    def cpu(self) -> float:
        return tree_cpu(self.ps)

    def stop(self) -> None:
        stop_server(self.proc, self.errlog)


class PrefectServer:
    """`prefect server start` with the settings the Prefect notes ask for (batch recorder, no analytics)."""

    def __init__(self, workdir: Path) -> None:
        self.home = workdir / "prefect-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "500",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            "PREFECT_UI_ENABLED": "false",
        }
        self.errlog = open(workdir / "prefect-server.log", "w")
        prefect = str(Path(PY).parent / "prefect")
        t0 = time.time()
        self.proc = subprocess.Popen(
            [
                prefect,
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-ui",
            ],
            cwd=workdir,
            env=self.env,
            stdout=self.errlog,
            stderr=subprocess.STDOUT,
        )
        self.ps = psutil.Process(self.proc.pid)
        self.http = httpx.Client(timeout=10)
        while time.time() - t0 < 90:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited; see {workdir / 'prefect-server.log'}")
            try:
                if self.http.get(self.api_url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError("prefect server did not become healthy in 90 s")
        self.startup_seconds = time.time() - t0

    def cpu(self) -> float:
        return tree_cpu(self.ps)

    def rss(self) -> int:
        return tree_rss(self.ps)

    def task_runs(self) -> int | None:
        try:
            return int(self.http.post(self.api_url + "/task_runs/count", json={}).json())
        except (httpx.HTTPError, ValueError, TypeError):
            return None

    def settle(
        self, before: int | None, expected: int, timeout: float = 30.0
    ) -> tuple[int | None, float]:
        """Wait until the server has recorded `expected` new task runs (or stops changing)."""
        t0 = time.time()
        last, stable_since = None, time.time()
        while time.time() - t0 < timeout:
            now = self.task_runs()
            if now is not None and before is not None and now - before >= expected:
                return now - before, time.time() - t0
            if now != last:
                last, stable_since = now, time.time()
            elif time.time() - stable_since > 8:
                break
            time.sleep(1)
        return (None if last is None or before is None else last - before), time.time() - t0

    def stop(self) -> None:
        children = []
        try:
            children = self.ps.children(recursive=True)
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for c in children:  # only processes this server started
            try:
                c.terminate()
            except psutil.Error:
                pass
        self.errlog.close()


class Monitor(threading.Thread):
    """Samples the simulator's billing and everyone's CPU/RSS once per `interval`."""

    def __init__(
        self,
        sim: Simulator,
        client: psutil.Process,
        prefect: PrefectServer | None,
        interval: float = 1.0,
    ) -> None:
        super().__init__(daemon=True)
        self.sim, self.client, self.prefect, self.interval = sim, client, prefect, interval
        self.samples: list[dict[str, Any]] = []
        self.peak_rss = 0
        self.peak_prefect_rss = 0
        self.done = threading.Event()

    def sample(self) -> dict[str, Any]:
        t = time.time()
        try:
            st = self.sim.stats()
        except (httpx.HTTPError, ValueError):
            st = {}
        rss = tree_rss(self.client)
        self.peak_rss = max(self.peak_rss, rss)
        s = {
            "t": t,
            "billed": st.get("images_billed"),
            "seen": st.get("requests_seen"),
            "rate_limited": st.get("rate_limited"),
            "sim_in_flight": st.get("in_flight"),
            "client_cpu": tree_cpu(self.client),
            "client_rss": rss,
            "sim_cpu": self.sim.cpu(),
            "prefect_cpu": self.prefect.cpu() if self.prefect else 0.0,
            "busy": system_busy(),
        }
        if self.prefect:
            self.peak_prefect_rss = max(self.peak_prefect_rss, self.prefect.rss())
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)


def run_client(
    label: str,
    cmd: list[str],
    env: dict[str, str],
    workdir: Path,
    sim: Simulator,
    prefect: PrefectServer | None,
    timeout: float,
) -> dict[str, Any]:
    """Run one client process to completion under the monitor; exact CPU and peak RSS from wait4."""
    logf = open(workdir / f"{label}.log", "w")
    sim_cpu0 = sim.cpu()
    pf_cpu0 = prefect.cpu() if prefect else 0.0
    busy0 = system_busy()
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    mon = Monitor(sim, psutil.Process(proc.pid), prefect)
    mon.start()

    def watchdog() -> None:
        if not mon.done.wait(timeout):
            log(f"{label}: over {timeout:.0f} s, sending SIGINT")
            proc.send_signal(signal.SIGINT)
            if not mon.done.wait(60):
                proc.kill()

    threading.Thread(target=watchdog, daemon=True).start()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    mon.done.set()
    mon.join()
    final = mon.sample()  # the simulator's final counts; client fields are 0 now
    logf.close()
    (workdir / f"{label}.samples.json").write_text(json.dumps(mon.samples))
    ours = (
        ru.ru_utime
        + ru.ru_stime
        + (sim.cpu() - sim_cpu0)
        + ((prefect.cpu() - pf_cpu0) if prefect else 0.0)
    )
    other = max(0.0, (system_busy() - busy0) - ours)
    return {
        "label": label,
        "cmd": cmd,
        "returncode": proc.returncode,
        "started": t0,
        "wall": wall,
        "cpu_user": ru.ru_utime,
        "cpu_sys": ru.ru_stime,
        "cpu": ru.ru_utime + ru.ru_stime,
        "maxrss_mb": ru.ru_maxrss / 1024,
        "peak_rss_sampled_mb": mon.peak_rss / 2**20,
        "sim_cpu": sim.cpu() - sim_cpu0,
        "prefect_cpu": (prefect.cpu() - pf_cpu0) if prefect else None,
        "prefect_peak_rss_mb": mon.peak_prefect_rss / 2**20 if prefect else None,
        "other_cores": other / wall if wall > 0 else 0.0,
        "samples": mon.samples,
        "sim_stats": sim.stats(),
        "final": final,
    }


# ------------------------------------------------------------------------------------ analysis


def interp(samples: list[dict[str, Any]], key: str, t: float) -> float:
    pts = [(s["t"], s[key]) for s in samples if s.get(key) is not None]
    if not pts:
        return 0.0
    if t <= pts[0][0]:
        return float(pts[0][1])
    for (ta, va), (tb, vb) in zip(pts, pts[1:]):
        if ta <= t <= tb:
            return va + (vb - va) * (t - ta) / (tb - ta) if tb > ta else float(vb)
    return float(pts[-1][1])


def traffic_span(samples: list[dict[str, Any]], total: int) -> tuple[float, float]:
    """(first sample with a request seen, first sample with every image billed or the last)."""
    seen = [s for s in samples if s.get("seen")]
    start = seen[0]["t"] if seen else samples[0]["t"]
    done = [s for s in samples if (s.get("billed") or 0) >= total]
    end = done[0]["t"] if done else samples[-1]["t"]
    return start, end


def steady_ipm(
    samples: list[dict[str, Any]], total: int, head: float, tail: float = 30.0
) -> dict[str, Any]:
    """Images billed per minute over [first request + head, all billed - tail], from the 1 s polls."""
    start, end = traffic_span(samples, total)
    a, b = start + head, end - tail
    if b - a < 10:
        return {"ipm": None, "window_s": max(0.0, b - a)}
    if b - a >= 60:
        # Whole minutes only: the limit is a 60 s sliding window, and a window that is not a
        # multiple of it can catch a burst (a bursty client then shows more than the limit).
        b = a + 60.0 * int((b - a) // 60)
    billed = interp(samples, "billed", b) - interp(samples, "billed", a)
    cpu = interp(samples, "client_cpu", b) - interp(samples, "client_cpu", a)
    return {
        "ipm": billed / (b - a) * 60.0,
        "window_s": b - a,
        "images": billed,
        "client_cpu_s": cpu,
        "traffic_s": end - start,
    }


def journal_ipm(
    finished: list[float], head: float, tail: float = 30.0, start: float | None = None
) -> float | None:
    """The same from the clients' own per-image finish times (journal `finished_at`)."""
    if not finished:
        return None
    finished = sorted(finished)
    t0 = finished[0] if start is None else start
    a, b = t0 + head, finished[-1] - tail
    if b - a < 10:
        return None
    if b - a >= 60:
        b = a + 60.0 * int((b - a) // 60)
    n = sum(1 for t in finished if a <= t <= b)
    return n / (b - a) * 60.0


def per_minute(samples: list[dict[str, Any]], total: int) -> list[int]:
    start, end = traffic_span(samples, total)
    out, t = [], start
    while t < end:
        out.append(
            round(interp(samples, "billed", min(t + 60, end)) - interp(samples, "billed", t))
        )
        t += 60
    return out


def read_journal(out: Path) -> list[float]:
    times = []
    path = out / "journal.jsonl"
    if not path.exists():
        return times
    with path.open() as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("status") == "succeeded":
                times.append(float(rec["finished_at"]))
    return times


def read_run_json(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------ the runs


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.workdir = Path(args.workdir) / stamp
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prefect: PrefectServer | None = None
        self.cache: dict[str, dict[str, Any]] = {}
        self.sections: list[str] = []
        self.commits: list[
            str
        ] = []  # git commit at the start of each imagebatch run reported in the next section

    # -- infrastructure

    def prefect_server(self) -> PrefectServer:
        if self.prefect is None:
            log("starting prefect server")
            self.prefect = PrefectServer(self.workdir)
            log(
                f"prefect server healthy in {self.prefect.startup_seconds:.1f} s at {self.prefect.api_url}"
            )
        return self.prefect

    def close(self) -> None:
        if self.prefect is not None:
            self.prefect.stop()
            self.prefect = None

    def client_env(self, sim: Simulator) -> dict[str, str]:
        pf = self.prefect_server()
        env = {
            **os.environ,
            "OPENAI_BASE_URL": sim.base_url,
            "OPENAI_API_KEY": API_KEY,
            "PREFECT_API_URL": pf.api_url,
            "PREFECT_HOME": str(pf.home),
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
        }
        return env

    def imagebatch(
        self,
        label: str,
        sim: Simulator,
        jobs: Path,
        flags: list[str],
        timeout: float,
        entry: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        out = self.workdir / label
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            *(entry or [PY, "-m", "imagebatch.cli"]),
            "run",
            str(jobs),
            "--out",
            str(out),
            "-q",
            *flags,
        ]
        if self.args.profile:
            # Diagnosis only: py-spy samples the client (its own CPU lands in the client's rusage).
            spy = str(Path(PY).parent / "py-spy")
            cmd = [
                spy,
                "record",
                "--format",
                "raw",
                "--rate",
                "100",
                "--gil",
                "-o",
                str(self.workdir / f"{label}.pyspy.txt"),
                "--",
                *cmd,
            ]
        env = {**self.client_env(sim), **(extra_env or {})}
        pf = self.prefect_server()
        before = pf.task_runs()
        log(f"{label}: {shlex.join(cmd[1:])}  against  {sim.describe()}")
        commit = git_commit()
        res = run_client(label, cmd, env, self.workdir, sim, pf, timeout)
        res["commit"] = commit
        self.commits.append(commit)
        n_jobs = sum(1 for _ in open(jobs)) - 1
        res["prefect_task_runs"], res["prefect_settle_s"] = pf.settle(before, n_jobs)
        run = read_run_json(out)
        res["run"] = {
            k: run.get(k) for k in ("counts", "stats", "seconds", "dispatch_seconds", "stopped")
        }
        res["finished_at"] = read_journal(out)
        res["kind"] = "imagebatch"
        res["flags"] = flags
        res["jobs"] = n_jobs
        self._cleanup(out)
        log(
            f"{label}: done in {res['wall']:.1f} s, rc={res['returncode']}, counts={run.get('counts')}"
        )
        return res

    def naive(
        self, label: str, sim: Simulator, jobs: Path, flags: list[str], timeout: float
    ) -> dict[str, Any]:
        out = self.workdir / label
        shutil.rmtree(out, ignore_errors=True)
        summary = self.workdir / f"{label}.summary.json"
        cmd = [
            PY,
            str(BENCH / "naive.py"),
            str(jobs),
            "--out",
            str(out),
            "--base-url",
            sim.base_url,
            "--summary",
            str(summary),
            *flags,
        ]
        env = {**os.environ, "OPENAI_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"}
        log(f"{label}: {shlex.join(cmd[1:])}  against  {sim.describe()}")
        res = run_client(label, cmd, env, self.workdir, sim, None, timeout)
        try:
            res["naive"] = json.loads(summary.read_text())
        except (OSError, ValueError):
            res["naive"] = {}
        res["finished_at"] = res["naive"].pop("finished_at", [])
        res["kind"] = "naive"
        res["flags"] = flags
        res["jobs"] = sum(1 for _ in open(jobs)) - 1
        self._cleanup(out)
        log(
            f"{label}: done in {res['wall']:.1f} s, rc={res['returncode']}, "
            f"ok={res['naive'].get('succeeded')} failed={res['naive'].get('failed')} 429s={res['naive'].get('http_429')}"
        )
        return res

    def _cleanup(self, out: Path) -> None:
        if not self.args.keep:
            shutil.rmtree(out / "images", ignore_errors=True)

    def sim(self, *flags: str, no_headers: bool = False, name: str = "sim") -> Simulator:
        return Simulator(self.workdir, *flags, no_headers=no_headers, name=name)

    # -- the 600-IPM workloads (cached so `naive` and `all` reuse them within one invocation)

    LIMITED = ("--latency", "uniform:1,3", "--ipm", "600", "--seed", "1")

    def limited_run(self, key: str) -> dict[str, Any]:
        if key in self.cache:
            return self.cache[key]
        n = self.args.jobs or 3000
        jobs = make_jobs(self.workdir / f"jobs-{n}.csv", n)
        timeout = self.args.timeout or 900
        no_headers = key in ("unknown-noheaders",)
        sim = self.sim(*self.LIMITED, no_headers=no_headers, name=key)
        try:
            if key == "fidelity":
                res = self.imagebatch(key, sim, jobs, ["--ipm", "600"], timeout)
            elif key.startswith("unknown"):
                res = self.imagebatch(key, sim, jobs, [], timeout)
            elif key.startswith("naive-c"):
                c = key.removeprefix("naive-c")
                res = self.naive(key, sim, jobs, ["--concurrency", c], timeout)
            else:
                raise ValueError(key)
        finally:
            sim.stop()
        res["sim_desc"] = sim.describe()
        self.cache[key] = res
        return res

    @staticmethod
    def rate_row(res: dict[str, Any], limit: float = 600.0) -> dict[str, Any]:
        total = res["jobs"]
        st = res["sim_stats"]
        s30 = steady_ipm(res["samples"], total, 30)
        s120 = steady_ipm(res["samples"], total, 120)
        seen = st.get("requests_seen") or 0
        rl = st.get("rate_limited") or 0
        traffic_start, traffic_end = traffic_span(res["samples"], total)
        ok_images = (
            (res["run"]["counts"] or {}).get("succeeded")
            if res["kind"] == "imagebatch"
            else res["naive"].get("succeeded")
        ) or 0
        return {
            "ipm30": s30["ipm"],
            "ipm120": s120["ipm"],
            "jipm30": journal_ipm(res["finished_at"], 30),
            "jipm120": journal_ipm(res["finished_at"], 120, start=traffic_start),
            "fid30": s30["ipm"] / limit if s30["ipm"] else None,
            "fid120": s120["ipm"] / limit if s120["ipm"] else None,
            "seen": seen,
            "rl": rl,
            "rl_pct": 100.0 * rl / seen if seen else 0.0,
            "billed": st.get("images_billed"),
            "ok": (res["run"]["counts"] or {}).get("succeeded")
            if res["kind"] == "imagebatch"
            else res["naive"].get("succeeded"),
            "failed": (
                (res["run"]["counts"] or {}).get("failed", 0)
                if res["kind"] == "imagebatch"
                else res["naive"].get("failed")
            ),
            "wall": res["wall"],
            "traffic_s": traffic_end - traffic_start,
            "eff_ipm": (60.0 * ok_images / (traffic_end - traffic_start))
            if traffic_end > traffic_start
            else None,
            "peak_sim_in_flight": st.get("peak_in_flight"),
            "per_minute": per_minute(res["samples"], total),
            "client_cpu": res["cpu"],
            "other_cores": res["other_cores"],
        }

    # -- benchmarks

    def bench_fidelity(self) -> None:
        res = self.limited_run("fidelity")
        self.commits = [res["commit"]]
        r = self.rate_row(res)
        lim = (res["run"]["stats"] or {}).get("limiter", {})
        rows = [
            (
                "achieved IPM, steady state (sim billing; skip first/last 30 s; whole minutes)",
                f"{_f(r['ipm30'])}",
                "",
                "",
            ),
            ("  / limit 600", _f(r["fid30"], 3), ">= 0.97", _ok(r["fid30"], 0.97)),
            ("achieved IPM from journal finished_at (same window)", _f(r["jipm30"]), "", ""),
            (
                "429s / requests",
                f"{r['rl']} / {r['seen']} = {r['rl_pct']:.2f} %",
                "<= 1 %",
                _ok(-r["rl_pct"], -1.0),
            ),
            ("succeeded / jobs", f"{r['ok']} / {res['jobs']}", "all", _ok(r["ok"] == res["jobs"])),
            ("images billed", f"{r['billed']}", f"{res['jobs']}", ""),
            ("wall time of the client process", f"{r['wall']:.1f} s", "", ""),
            (
                "traffic span (first request to last image billed)",
                f"{_f(r['traffic_s'])} s",
                "",
                "",
            ),
            ("images billed per minute of traffic", " ".join(map(str, r["per_minute"])), "", ""),
            (
                "limiter: in-flight cap / peak / latency estimate",
                f"{lim.get('in_flight_cap')} / {lim.get('peak_in_flight')} / {_f(lim.get('latency_estimate'), 2)} s",
                "",
                "",
            ),
            (
                "client CPU (user+sys) / other processes' load",
                f"{res['cpu']:.1f} s / {res['other_cores']:.2f} cores",
                "",
                "",
            ),
        ]
        self.report(
            "fidelity",
            "1. Limit fidelity (imagebatch told --ipm 600)",
            f"simulator: `{res['sim_desc']}`; {res['jobs']} single-image gpt-image-2 jobs; "
            f"client: `imagebatch run jobs.csv --out DIR -q --ipm 600`",
            rows,
            extra={"fidelity": r},
        )

    def bench_unknown(self) -> None:
        rows = []
        extra = {}
        self.commits = [self.limited_run(k)["commit"] for k in ("unknown", "unknown-noheaders")]
        for key, what in (
            ("unknown", "stock simulator (sends x-ratelimit-* headers)"),
            ("unknown-noheaders", "bench/sim_noheaders.py (429s only, no x-ratelimit-* headers)"),
        ):
            res = self.limited_run(key)
            r = self.rate_row(res)
            lim = (res["run"]["stats"] or {}).get("limiter", {})
            extra[key] = r
            rows += [
                (f"**{what}**", "", "", ""),
                (
                    "achieved IPM after the first 2 min (sim billing; skip last 30 s; whole minutes)",
                    _f(r["ipm120"]),
                    "",
                    "",
                ),
                ("  / limit 600", _f(r["fid120"], 3), ">= 0.85", _ok(r["fid120"], 0.85)),
                ("  same from journal finished_at", _f(r["jipm120"]), "", ""),
                (
                    "  (steady state skipping only 30 s: IPM / limit)",
                    f"{_f(r['ipm30'])} / {_f(r['fid30'], 3)}",
                    "",
                    "",
                ),
                (
                    "429s / requests",
                    f"{r['rl']} / {r['seen']} = {r['rl_pct']:.2f} %",
                    "<= 5 %",
                    _ok(-r["rl_pct"], -5.0),
                ),
                (
                    "succeeded / jobs",
                    f"{r['ok']} / {res['jobs']}",
                    "all",
                    _ok(r["ok"] == res["jobs"]),
                ),
                ("wall time", f"{r['wall']:.1f} s", "", ""),
                (
                    "images billed per minute of traffic",
                    " ".join(map(str, r["per_minute"])),
                    "",
                    "",
                ),
                (
                    "limiter end state: ipm limit / estimate / pauses / 429s seen",
                    f"{lim.get('ipm_limit')} / {_f(lim.get('ipm_estimate'))} / {lim.get('pauses')} / {lim.get('rate_limited')}",
                    "",
                    "",
                ),
                (
                    "client CPU / other processes' load",
                    f"{res['cpu']:.1f} s / {res['other_cores']:.2f} cores",
                    "",
                    "",
                ),
            ]
        self.report(
            "unknown",
            "2. Unknown limit (imagebatch not told the limit)",
            f"simulator: `{' '.join(self.LIMITED)}`; {self.args.jobs or 3000} jobs; client: `imagebatch run jobs.csv --out DIR -q`",
            rows,
            extra=extra,
        )

    def bench_naive(self) -> None:
        keys = [
            ("fidelity", "imagebatch --ipm 600"),
            ("unknown", "imagebatch, not told (headers)"),
            ("unknown-noheaders", "imagebatch, not told (no headers)"),
        ]
        keys += [(f"naive-c{c}", f"naive, semaphore {c}") for c in self.args.naive_concurrency]
        table = []
        rr = {}
        for key, what in keys:
            res = self.limited_run(key)
            r = self.rate_row(res)
            rr[key] = r
            table.append(
                (
                    what,
                    _f(r["ipm30"]),
                    _f(r["fid30"], 3),
                    _f(r["ipm120"]),
                    _f(r["eff_ipm"]),
                    f"{r['rl']}",
                    f"{r['rl_pct']:.1f} %",
                    f"{r['ok']}/{res['jobs']}",
                    f"{r['wall']:.0f} s",
                    f"{res['cpu']:.0f} s",
                    " ".join(map(str, r["per_minute"])),
                )
            )
        head = (
            "client",
            "steady IPM (skip 30 s)",
            "/ 600",
            "steady IPM (skip 2 min)",
            "succeeded per min of traffic",
            "429s",
            "429 % of req",
            "succeeded",
            "wall",
            "client CPU",
            "billed per minute",
        )
        ratios = []
        for ours in ("fidelity", "unknown", "unknown-noheaders"):
            for c in self.args.naive_concurrency:
                nv = rr[f"naive-c{c}"]
                o = rr[ours]
                ratios.append(
                    (
                        f"{ours} vs naive-c{c}",
                        _ratio(o["ipm30"], nv["ipm30"]),
                        _ratio(o["ipm120"], nv["ipm120"]),
                        _ratio(o["eff_ipm"], nv["eff_ipm"]),
                        f"{o['rl']} vs {nv['rl']}",
                        _ratio(o["wall"], nv["wall"]),
                        f"{o['ok']} vs {nv['ok']}",
                    )
                )
        self.commits = [
            self.cache[k]["commit"] for k in ("fidelity", "unknown", "unknown-noheaders")
        ]
        rhead = (
            "ours vs naive",
            "steady IPM ratio (skip 30 s)",
            "steady IPM ratio (skip 2 min)",
            "succeeded-per-minute ratio",
            "429s",
            "wall ratio",
            "succeeded",
        )
        body = (
            _md_table(head, table)
            + "\n\nRatios, measured side by side in this invocation:\n\n"
            + _md_table(rhead, ratios)
        )
        desc = (
            f"simulator: `{' '.join(self.LIMITED)}` (fresh process per client); {self.args.jobs or 3000} jobs; "
            "naive = bench/naive.py: asyncio + httpx + tenacity (wait_random_exponential(min=1, max=60), "
            "stop_after_attempt(6), retry on 429/5xx/transport), fixed semaphore, writes each image"
        )
        self.report_raw(
            "naive",
            "3. Naive baseline beside imagebatch (same workload, same invocation)",
            desc,
            body,
            extra=rr,
            printable=[head] + table + [()] + [rhead] + ratios,
        )

    def bench_overhead(self) -> None:
        n = self.args.jobs or 5000
        jobs = make_jobs(self.workdir / f"jobs-{n}.csv", n)
        timeout = self.args.timeout or 600
        bare_key = f"bare-c{self.args.bare_concurrency}"
        keys = ["imagebatch", "chunk", bare_key] + (["notask"] if self.args.diag else [])
        results = {}
        for key in keys:
            sim = self.sim("--latency", "0", "--no-text", "--seed", "1", name=f"overhead-{key}")
            try:
                if key == "imagebatch":
                    res = self.imagebatch("overhead-imagebatch", sim, jobs, [], timeout)
                elif key == "chunk":
                    res = self.imagebatch(
                        "overhead-chunk", sim, jobs, ["--task-per", "chunk"], timeout
                    )
                elif key == "notask":
                    res = self.imagebatch(
                        "overhead-notask",
                        sim,
                        jobs,
                        [],
                        timeout,
                        entry=[PY, str(BENCH / "diag_notask.py")],
                    )
                else:
                    res = self.naive(
                        f"overhead-{key}",
                        sim,
                        jobs,
                        ["--concurrency", str(self.args.bare_concurrency), "--no-retry"],
                        timeout,
                    )
            finally:
                sim.stop()
            res["sim_desc"] = sim.describe()
            results[key] = res
        extra = {key: self.overhead_metrics(res, n) for key, res in results.items()}
        cols = [
            ("imagebatch", "imagebatch (task per job, default)"),
            ("chunk", "imagebatch --task-per chunk"),
            (bare_key, f"bare asyncio+httpx (c={self.args.bare_concurrency})"),
        ]
        if "notask" in extra:
            cols.append(("notask", "diagnostic: imagebatch minus Prefect task layer"))
        ib, bare = extra["imagebatch"], extra[bare_key]
        head = ("metric", *[c[1] for c in cols], "ratio to bare: per job / chunk", "target")

        def row(
            label: str, fmt: Callable[[dict], str], ratio_key: str | None = None, target: str = ""
        ) -> tuple:
            ratio = (
                f"{_ratio(ib.get(ratio_key), bare.get(ratio_key))} / {_ratio(extra['chunk'].get(ratio_key), bare.get(ratio_key))}"
                if ratio_key
                else ""
            )
            return (label, *[fmt(extra[k]) for k, _ in cols], ratio, target)

        rows = [
            row("succeeded", lambda e: f"{e['ok']}/{n}"),
            row("images/s, whole process (start..exit)", lambda e: _f(e["ips_wall"]), "ips_wall"),
            row(
                "images/s, dispatch (run.json dispatch_seconds / loop time)",
                lambda e: _f(e["ips_dispatch"]),
                "ips_dispatch",
                f">= 100: per job {_ok(ib['ips_dispatch'], 100)}, chunk {_ok(extra['chunk']['ips_dispatch'], 100)}",
            ),
            row(
                "images/s, steady middle of traffic (sim billing)",
                lambda e: _f(e["ips_mid"]),
                "ips_mid",
            ),
            row(
                "client CPU ms/image, whole process", lambda e: _f(e["cpu_ms_img"], 2), "cpu_ms_img"
            ),
            row(
                "client CPU ms/image, steady middle",
                lambda e: _f(e["cpu_ms_img_mid"], 2),
                "cpu_ms_img_mid",
            ),
            row("simulator CPU ms/image, steady middle", lambda e: _f(e["sim_ms_img_mid"], 2)),
            row(
                "Prefect server CPU ms/image, steady middle",
                lambda e: _f(e["prefect_ms_img_mid"], 2),
            ),
            row("Prefect server CPU s, whole client run", lambda e: _f(e["prefect_cpu"])),
            row(
                "cores in steady state: client / simulator / Prefect server",
                lambda e: (
                    f"{_f(e['client_cores_mid'], 2)} / {_f(e['sim_cores_mid'], 2)} / {_f(e['prefect_cores_mid'], 2)}"
                ),
            ),
            row(
                "other processes on the machine (cores, average)", lambda e: _f(e["other_cores"], 2)
            ),
            row("start to first request", lambda e: f"{_f(e['startup_s'], 1)} s"),
            row("peak requests in flight at the simulator", lambda e: f"{e['peak_sim_in_flight']}"),
            row("client peak RSS", lambda e: f"{e['maxrss_mb']:.0f} MB"),
            row(
                "task runs recorded by the Prefect server",
                lambda e: (
                    f"{e['prefect_task_runs']}" if e["prefect_task_runs"] is not None else "-"
                ),
            ),
        ]
        desc = (
            f"simulator: `{results['imagebatch']['sim_desc']}` (fresh process per client); {n} single-image jobs; "
            f"imagebatch: `imagebatch run jobs.csv --out DIR -q [--task-per chunk]` (no limits: slow start toward the 256 ceiling), real Prefect server; "
            f"bare: `bench/naive.py --concurrency {self.args.bare_concurrency} --no-retry` (POST, b64 decode, write file)"
            + (
                "; diagnostic: `bench/diag_notask.py run ...` = the same CLI with `process_job` called as a plain coroutine "
                "(flow, limiter, retries, store, journal unchanged)"
                if "notask" in extra
                else ""
            )
        )
        self.report_raw(
            "overhead",
            "4. Overhead (unlimited simulator, latency 0)",
            desc,
            _md_table(head, rows),
            extra=extra,
            printable=[head] + rows,
        )

    @staticmethod
    def overhead_metrics(res: dict[str, Any], n: int) -> dict[str, Any]:
        st = res["sim_stats"]
        ok = (
            (res["run"]["counts"] or {}).get("succeeded")
            if res["kind"] == "imagebatch"
            else res["naive"].get("succeeded")
        )
        start, end = traffic_span(res["samples"], n)
        # steady: the middle of the traffic (drop 2 s at each end), from the 1 s polls
        a, b = start + 2, end - 2
        if b - a < 3:
            a, b = start, end
        span = max(1e-9, b - a)
        smp = res["samples"]
        mid_imgs = interp(smp, "billed", b) - interp(smp, "billed", a)
        mid_cpu = interp(smp, "client_cpu", b) - interp(smp, "client_cpu", a)
        mid_sim = interp(smp, "sim_cpu", b) - interp(smp, "sim_cpu", a)
        mid_pf = interp(smp, "prefect_cpu", b) - interp(smp, "prefect_cpu", a)
        is_ib = res["kind"] == "imagebatch"
        disp = (
            (res.get("run") or {}).get("dispatch_seconds")
            if is_ib
            else res["naive"].get("loop_seconds")
        )
        lim = ((res.get("run") or {}).get("stats") or {}).get("limiter", {})
        return {
            "ok": ok,
            "wall": res["wall"],
            "ips_wall": (ok or 0) / res["wall"],
            "ips_dispatch": (ok or 0) / disp if disp else None,
            "ips_mid": mid_imgs / span,
            "cpu_ms_img": 1000 * res["cpu"] / max(1, ok or 0),
            "cpu_ms_img_mid": 1000 * mid_cpu / mid_imgs if mid_imgs else None,
            "sim_ms_img_mid": 1000 * mid_sim / mid_imgs if mid_imgs else None,
            "prefect_cpu": res["prefect_cpu"],
            "prefect_ms_img_mid": 1000 * mid_pf / mid_imgs if mid_imgs and is_ib else None,
            "client_cores_mid": mid_cpu / span,
            "sim_cores_mid": mid_sim / span,
            "prefect_cores_mid": mid_pf / span if is_ib else None,
            "startup_s": start - res["started"],
            "peak_sim_in_flight": st.get("peak_in_flight"),
            "limiter_peak": lim.get("peak_in_flight"),
            "limiter_cap_end": lim.get("in_flight_cap"),
            "prefect_task_runs": res.get("prefect_task_runs"),
            "maxrss_mb": res["maxrss_mb"],
            "other_cores": res["other_cores"],
        }

    def bench_memory(self) -> None:
        n = self.args.jobs or 10000
        jobs = make_jobs(self.workdir / f"jobs-{n}.csv", n)
        sim = self.sim("--latency", "uniform:0.5,2", "--no-text", "--seed", "1", name="memory")
        try:
            res = self.imagebatch("memory", sim, jobs, [], self.args.timeout or 900)
        finally:
            sim.stop()
        samples = res["samples"]
        quart = []
        for q in (0.25, 0.5, 0.75, 1.0):
            hit = next((s for s in samples if (s.get("billed") or 0) >= q * n), None)
            quart.append(f"{hit['client_rss'] / 2**20:.0f}" if hit and hit["client_rss"] else "-")
        lim = ((res["run"] or {}).get("stats") or {}).get("limiter", {})
        ok = (res["run"]["counts"] or {}).get("succeeded")
        rows = [
            (
                "client peak RSS (wait4 ru_maxrss)",
                f"{res['maxrss_mb']:.0f} MB",
                "<= 500 MB",
                _ok(-res["maxrss_mb"], -500),
            ),
            (
                "client peak RSS (psutil, 1 s samples)",
                f"{res['peak_rss_sampled_mb']:.0f} MB",
                "",
                "",
            ),
            (
                "client RSS at 25 / 50 / 75 / 100 % of images billed",
                " / ".join(quart) + " MB",
                "",
                "",
            ),
            (
                "Prefect server peak RSS (separate process)",
                f"{_f(res['prefect_peak_rss_mb'])} MB",
                "",
                "",
            ),
            (
                "simulator peak in flight / limiter peak in flight",
                f"{res['sim_stats'].get('peak_in_flight')} / {lim.get('peak_in_flight')}",
                "",
                "",
            ),
            ("succeeded / jobs", f"{ok} / {n}", "", ""),
            ("wall / client CPU", f"{res['wall']:.0f} s / {res['cpu']:.0f} s", "", ""),
            (
                "task runs recorded by the Prefect server",
                f"{res.get('prefect_task_runs')}/{n}",
                "",
                "",
            ),
        ]
        size = None
        try:
            from imagebatch.simulator.render import render_image

            size = len(
                render_image(
                    "a watercolor of a lighthouse, variant 0",
                    0,
                    "1024x1024",
                    "png",
                    text=False,
                    cache=None,
                )
            )
        except Exception:
            pass
        desc = (
            f"simulator: `{sim.describe()}`; {n} single-image 1024x1024 jobs; "
            f"client: `imagebatch run jobs.csv --out DIR -q` (no limits: in flight grows to the 256 ceiling). "
            f"Simulator PNGs are about {size or '?'} bytes each (real 1024x1024 PNGs are ~1-3 MB)"
        )
        self.report(
            "memory",
            "5. Memory (10,000 jobs)",
            desc,
            rows,
            extra={"memory": {k: v for k, v in res.items() if k not in ("samples", "finished_at")}},
        )

    def bench_faults(self) -> None:
        n = self.args.jobs or 800
        jobs = make_jobs(self.workdir / f"jobs-{n}.csv", n)
        seed = self.args.sim_seed if self.args.sim_seed is not None else 7
        flags = (
            "--latency",
            "uniform:0.2,1",
            "--ipm",
            "600",
            "--error-rate",
            "0.2",
            "--seed",
            str(seed),
        )
        rows = []
        extra = {}
        for no_headers in (True, False):
            key = "faults-noheaders" if no_headers else "faults-headers"
            sim = self.sim(*flags, no_headers=no_headers, name=key)
            try:
                res = self.imagebatch(key, sim, jobs, [], self.args.timeout or 900)
            finally:
                sim.stop()
            st = res["sim_stats"]
            counts = res["run"]["counts"] or {}
            stats = res["run"]["stats"] or {}
            status = st.get("status", {})
            fivexx = sum(v for k, v in status.items() if k.startswith("5"))
            extra[key] = {
                "counts": counts,
                "sim": st,
                "stats": {k: v for k, v in stats.items() if k != "limiter"},
            }
            what = (
                "sim_noheaders (429s only)"
                if no_headers
                else "stock simulator (x-ratelimit headers)"
            )
            rows += [
                (f"**{what}**", "", "", ""),
                (
                    "jobs succeeded",
                    f"{counts.get('succeeded')} / {n} (failed {counts.get('failed', 0)}, not_run {counts.get('not_run', 0)})",
                    "all",
                    _ok(counts.get("succeeded") == n),
                ),
                (
                    "images billed by the simulator",
                    f"{st.get('images_billed')}",
                    f"== {n}",
                    _ok(st.get("images_billed") == n),
                ),
                (
                    "simulator answers: 200 / 429 / 5xx",
                    f"{status.get('200', 0)} / {st.get('rate_limited')} / {fivexx}",
                    "429s > 0",
                    "",
                ),
                (
                    "client retries / 429s seen",
                    f"{stats.get('retries', 0)} / {stats.get('rate_limited', 0)}",
                    "",
                    "",
                ),
                ("wall", f"{res['wall']:.0f} s", "", ""),
            ]
        desc = (
            f"simulator: `{' '.join(flags)}` (20 % of admitted requests answered 500/503, unbilled); {n} jobs; "
            "client: `imagebatch run jobs.csv --out DIR -q` (not told the limit, so the limit is met as 429s)"
        )
        self.report("faults", "6. Faults (20 % 5xx + IPM limit)", desc, rows, extra=extra)

    def bench_diag429(self) -> None:
        """Diagnostic: where the 429s of an unknown limit come from (bench/diag_trace.py timeline)."""
        n = self.args.jobs or 1000
        jobs = make_jobs(self.workdir / f"jobs-{n}.csv", n)
        variants = [("per job (default)", []), ("--task-per chunk", ["--task-per", "chunk"])]
        cols = []
        self.commits = []
        for i, (name, flags) in enumerate(variants):
            trace = self.workdir / f"diag429-{i}.trace.jsonl"
            sim = self.sim(*self.LIMITED, no_headers=True, name=f"diag429-{i}")
            try:
                res = self.imagebatch(
                    f"diag429-{i}",
                    sim,
                    jobs,
                    flags,
                    self.args.timeout or 600,
                    entry=[PY, str(BENCH / "diag_trace.py")],
                    extra_env={"BENCH_TRACE": str(trace)},
                )
            finally:
                sim.stop()
            self.commits.append(res["commit"])
            cols.append((name, self.trace_metrics(trace, res)))
        labels = [
            ("sim429", "429s answered by the simulator / processed by the client"),
            ("first_sent", "first refused request granted at (s after the first grant)"),
            ("first_seen", "first 429 processed by the limiter at (delay after that grant)"),
            ("between", "grants in that interval"),
            ("burst", "429s on requests granted before the first 429 was processed / after"),
            ("rate_before", "grant rate in the 2 s before the first refused grant"),
            ("at_first", "in flight / in-flight cap / slow-start cap at that grant"),
            (
                "ok_dur",
                "200 answers granted 0-6 s / 6-13 s: grant to answer processed, median (server latency 1-3 s)",
            ),
            (
                "rtt",
                "refused requests: grant to 429 processed, median / max (the simulator answers 429 at once)",
            ),
            (
                "wlag",
                "event-loop lag (overshoot of a 20 ms sleep) in that interval, median / p99 / max",
            ),
            ("lag", "event-loop lag over the whole run, median / p99 / max"),
            ("cpu", "client CPU s / wall s"),
        ]
        head = ("metric", *[c[0] for c in cols])
        rows = [(label, *[c[1].get(key, "-") for c in cols]) for key, label in labels]
        desc = (
            f"simulator: `{sim.describe()}`; {n} jobs; client: `bench/diag_trace.py run jobs.csv --out DIR -q [--task-per chunk]` "
            "(the CLI with limiter grants, 429s, request ends and event-loop lag traced; not told the limit)"
        )
        self.report_raw(
            "diag429",
            "Diagnostic: the 429 burst when the limit is unknown and unannounced",
            desc,
            _md_table(head, rows),
            extra={c[0]: c[1] for c in cols},
            printable=[head] + rows,
        )

    @staticmethod
    def trace_metrics(trace: Path, res: dict[str, Any]) -> dict[str, str]:
        events = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
        grants = [e for e in events if e["ev"] == "grant"]
        limited = [e for e in events if e["ev"] == "429"]
        answers = [e for e in events if e["ev"] == "answer"]
        lags = [e for e in events if e["ev"] == "lag"]
        refused = sorted((e for e in answers if e.get("status") == 429), key=lambda e: e["started"])
        out = {
            "sim429": f"{res['sim_stats'].get('rate_limited')} / {len(limited)}",
            "cpu": f"{res['cpu']:.0f} / {res['wall']:.0f}",
        }

        def pct(xs: list[float], q: float) -> float | None:
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

        def lagtxt(xs: list[float]) -> str:
            return f"{_f(pct(xs, 0.5), 1)} / {_f(pct(xs, 0.99), 1)} / {_f(max(xs) if xs else None, 1)} ms"

        out["lag"] = lagtxt([e["ms"] for e in lags])
        if not grants:
            return out
        t0 = grants[0]["t"]
        early = [
            e["t"] - e["started"]
            for e in answers
            if e.get("status") == 200 and e["started"] - t0 < 6
        ]
        mid = [
            e["t"] - e["started"]
            for e in answers
            if e.get("status") == 200 and 6 <= e["started"] - t0 < 13
        ]
        out["ok_dur"] = f"{_f(pct(early, 0.5), 2)} s / {_f(pct(mid, 0.5), 2)} s"
        if not limited or not refused:
            return out
        first_seen = limited[0]["t"]
        first_sent = refused[0]["started"]
        burst = [e for e in refused if e["started"] < first_seen]
        after = [e for e in refused if e["started"] >= first_seen]
        between = [g for g in grants if first_sent <= g["t"] <= first_seen]
        at_first = max((g for g in grants if g["t"] <= first_sent), key=lambda g: g["t"])
        rtt = [e["t"] - e["started"] for e in burst]
        out.update(
            {
                "first_sent": f"{first_sent - t0:.2f} s",
                "first_seen": f"{first_seen - t0:.2f} s (+{first_seen - first_sent:.2f} s)",
                "between": f"{len(between)}",
                "burst": f"{len(burst)} / {len(after)}",
                "rate_before": f"{sum(1 for g in grants if first_sent - 2 <= g['t'] < first_sent) / 2.0:.0f} /s",
                "at_first": f"{at_first['in_flight']} / {at_first['cap']} / {at_first['slow_cap']}",
                "rtt": f"{_f(pct(rtt, 0.5), 2)} / {_f(max(rtt), 2)} s",
                "wlag": lagtxt([e["ms"] for e in lags if first_sent - 2 <= e["t"] <= first_seen]),
            }
        )
        return out

    # -- output

    def report(
        self, name: str, title: str, desc: str, rows: list[tuple], extra: dict | None = None
    ) -> None:
        head = ("metric", "value", "target", "ok")
        self.report_raw(
            name, title, desc, _md_table(head, rows), extra=extra, printable=[head] + rows
        )

    def report_raw(
        self,
        name: str,
        title: str,
        desc: str,
        body: str,
        *,
        extra: dict | None,
        printable: list[tuple],
    ) -> None:
        print()
        print(f"== {title}")
        print(desc)
        _print_table(printable)
        cmd = shlex.join([Path(PY).as_posix(), "bench/run_bench.py", *sys.argv[1:]])
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        load = os.getloadavg()
        section = (
            f"\n## {title}\n\n"
            f"- date: {now}; commit at each imagebatch client start: `{', '.join(dict.fromkeys(self.commits)) or git_commit()}`; "
            f"command: `{cmd}`\n"
            f"- machine: {os.cpu_count()} cores, load average at report {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
            f"raw logs: `{self.workdir}`\n"
            f"- setup: {desc}\n\n{body}\n"
        )
        self.commits = []
        (self.workdir / f"{name}.json").write_text(json.dumps(extra, default=str, indent=1))
        if not self.args.no_record:
            with RESULTS.open("a", encoding="utf-8") as f:
                if f.tell() == 0:
                    f.write(
                        "# imagebatch benchmark results\n\nAppended by `bench/run_bench.py`; newest last. See bench/README.md.\n"
                    )
                f.write(section)


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _ratio(a: Any, b: Any) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def _ok(v: Any, threshold: float | None = None) -> str:
    if threshold is None:
        return "ok" if v else "MISS"
    if v is None:
        return "MISS"
    return "ok" if v >= threshold else "MISS"


def _md_table(head: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = list(r) + [""] * (len(head) - len(r))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _print_table(rows: list[tuple]) -> None:
    blocks: list[list[tuple]] = [[]]
    for r in rows:
        if r == ():
            blocks.append([])
        else:
            blocks[-1].append(r)
    for block in blocks:
        if not block:
            continue
        n = max(len(r) for r in block)
        cells = [[str(c).replace("**", "") for c in r] + [""] * (n - len(r)) for r in block]
        widths = [max(len(c[i]) for c in cells) for i in range(n)]
        for c in cells:
            print("  ".join(c[i].ljust(widths[i]) for i in range(n)).rstrip())
        print()


def bench_payload(bench: Bench) -> None:
    """Realistic 3 MB payloads against the openai SDK loop (bench/payload_bench.py)."""
    from payload_bench import bench_payload as run  # bench/ is on sys.path (the script's folder)

    run(bench)


def bench_discovery(bench: Bench) -> None:
    """Issue 13's unknown limit without headers, three runs (bench/discovery_bench.py)."""
    from discovery_bench import bench_discovery as run  # bench/ is on sys.path

    run(bench)


BENCHES: dict[str, Callable[[Bench], None]] = {
    "overhead": Bench.bench_overhead,
    "faults": Bench.bench_faults,
    "memory": Bench.bench_memory,
    "fidelity": Bench.bench_fidelity,
    "unknown": Bench.bench_unknown,
    "naive": Bench.bench_naive,
    "payload": bench_payload,
    "discovery": bench_discovery,
}
DIAGNOSTICS: dict[str, Callable[[Bench], None]] = {"diag429": Bench.bench_diag429}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="imagebatch benchmarks (see bench/README.md)")
    ap.add_argument("bench", nargs="+", choices=[*BENCHES, *DIAGNOSTICS, "all"])
    ap.add_argument(
        "--jobs",
        type=int,
        help="override the number of jobs (default per benchmark: 3000/5000/10000/800)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        help="seconds before a client is interrupted (default per benchmark)",
    )
    ap.add_argument(
        "--naive-concurrency",
        type=int,
        nargs="+",
        default=[16, 64],
        help="naive semaphore sizes (default 16 64)",
    )
    ap.add_argument(
        "--diag",
        action="store_true",
        help="overhead: also run bench/diag_notask.py (no Prefect task layer)",
    )
    ap.add_argument("--sim-seed", type=int, help="faults: simulator seed (default 7)")
    ap.add_argument(
        "--bare-concurrency",
        type=int,
        default=64,
        help="bare loop concurrency for overhead (default 64)",
    )
    ap.add_argument(
        "--in-flight",
        type=int,
        default=64,
        help="payload: requests in flight for the SDK loop and imagebatch (default 64)",
    )
    ap.add_argument(
        "--payload-runs",
        nargs="+",
        choices=["sdk", "ephemeral", "server"],
        default=["sdk", "ephemeral", "server"],
        help="payload: which clients to run, in this order (default all three)",
    )
    ap.add_argument(
        "--payload-flags",
        default="",
        help="payload: extra flags for `imagebatch run`, one string (attribution experiments)",
    )
    ap.add_argument("--runs", type=int, help="discovery: runs one after the other (default 3)")
    ap.add_argument(
        "--ref-flags",
        default="",
        help='discovery: extra bench/refserver.py flags, one string (e.g. "--png-mb 0.3")',
    )
    ap.add_argument("--workdir", default=os.environ.get("BENCH_WORKDIR", "/tmp/imagebatch-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the images written by each run")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="run imagebatch under py-spy (collapsed stacks in the work directory); implies --no-record",
    )
    args = ap.parse_args(argv)
    if args.profile:
        args.no_record = True
    names = list(BENCHES) if "all" in args.bench else args.bench
    bench = Bench(args)
    log(f"work directory {bench.workdir}")
    try:
        for name in names:
            {**BENCHES, **DIAGNOSTICS}[name](bench)
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
