"""`run_bench.py payload`: realistic payloads, imagebatch against the simplest SDK loop (issue 13).

Three clients, one after the other in one invocation, each against a fresh
bench/refserver.py (1024x1024 PNGs of about 3 MB, latency uniform:1,3, no limit), all with the
same jobs CSV and the same requests in flight (default 64):

- `sdk`: bench/sdk_loop.py (official `openai` SDK, semaphore of 64, b64 decode, write file);
- `ephemeral`: `imagebatch run --max-in-flight 64` with no PREFECT_API_URL and no server, so
  the run serves Prefect's API from a thread of its own process (flows/prefect_inprocess.py;
  before that change Prefect started its temporary API server as a subprocess of the client;
  if the in-process start fails it still does, and the tree then counts it); own
  PREFECT_HOME, warmed once by an unmeasured 4-job run so database migrations are not billed
  to the run;
- `server`: the same command against the invocation's `prefect server start` (client tree
  measured; the server's CPU and RSS reported beside it).

Measured over the client's whole process tree: peak RSS is the largest sum of RSS over the
client and all its descendants, sampled with psutil every 0.2 s; CPU is exact: the driver is
a child subreaper (PR_SET_CHILD_SUBREAPER), so `os.wait4` on the client gives its user+sys
plus every descendant it reaped, and descendants it left behind are reaped by the driver
with `os.wait4` too. The psutil per-process CPU sum is kept as a cross-check.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil
from run_bench import (
    API_KEY,
    BENCH,
    PY,
    ROOT,
    _md_table,
    git_commit,
    log,
    make_jobs,
    read_run_json,
    stop_server,
    system_busy,
    tree_cpu,
    tree_rss,
)

if TYPE_CHECKING:
    from run_bench import Bench, PrefectServer

LATENCY = "uniform:1,3"
TARGET_RATIO = 2.0
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants of a client are re-parented to this process, so their CPU is not lost."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class RefServer:
    """bench/refserver.py in its own process, on a free port."""

    def __init__(self, workdir: Path, name: str, *flags: str) -> None:
        self.cmd = [PY, str(BENCH / "refserver.py"), "--port", "0", *flags]
        self.errlog = open(workdir / f"{name}.refserver.log", "w")
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.errlog, text=True
        )
        self.ps = psutil.Process(self.proc.pid)
        self.http = httpx.Client(timeout=10)
        self.base_url = self._wait_listening()
        self.peak_rss = 0

    def _wait_listening(self, timeout: float = 60.0) -> str:
        assert self.proc.stdout is not None
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline()
                if "listening on" in line:
                    return line.strip().rsplit(" ", 1)[-1]
        self.stop()
        raise RuntimeError(f"refserver did not start: {shlex.join(self.cmd)}")

    def describe(self) -> str:
        return shlex.join(["bench/refserver.py", *self.cmd[4:]])

    def stats(self) -> dict[str, Any]:
        return self.http.get(self.base_url.removesuffix("/v1") + "/_ref/stats").json()

    def stop(self) -> None:
        stop_server(self.proc, self.errlog)


class TreeMonitor(threading.Thread):
    """Samples the client's process tree (RSS sum, per-process CPU) every 0.2 s, the refserver every 1 s."""

    def __init__(self, root: psutil.Process, ref: RefServer, prefect: PrefectServer | None) -> None:
        super().__init__(daemon=True)
        self.root, self.ref, self.prefect = root, ref, prefect
        self.done = threading.Event()
        self.peak_tree = self.peak_root = self.peak_children = self.peak_prefect = 0
        self.cpu: dict[int, float] = {}
        self.procs: dict[int, str] = {}
        self.first_request: float | None = None
        self.series: list[tuple[float, int, int]] = []  # (t, tree RSS, images billed)
        self._last_ref = 0.0
        self._billed = 0

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = root_rss = 0
        for p in procs:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    t = p.cpu_times()
                    self.procs.setdefault(p.pid, " ".join(p.cmdline()[:4])[:120])
            except psutil.Error:
                continue
            total += rss
            if p.pid == self.root.pid:
                root_rss = rss
            self.cpu[p.pid] = max(self.cpu.get(p.pid, 0.0), t.user + t.system)
        self.peak_tree = max(self.peak_tree, total)
        self.peak_root = max(self.peak_root, root_rss)
        self.peak_children = max(self.peak_children, total - root_rss)
        self.ref.peak_rss = max(self.ref.peak_rss, tree_rss(self.ref.ps))
        if self.prefect is not None:
            self.peak_prefect = max(self.peak_prefect, self.prefect.rss())
        now = time.time()
        if now - self._last_ref >= 1.0:
            self._last_ref = now
            try:
                st = self.ref.stats()
                self._billed = st["images_billed"]
                if self.first_request is None and st["requests_seen"] > 0:
                    self.first_request = now
            except (httpx.HTTPError, ValueError, KeyError):
                pass
        self.series.append((now, total, self._billed))

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(0.2)


def reap_leftovers(pids: list[int], wait: float = 30.0) -> tuple[float, list[int]]:
    """user+sys of descendants the client left behind (ours now, as subreaper); stragglers get SIGTERM."""
    cpu, left = 0.0, []
    deadline = time.time() + wait
    pending = set(pids)
    while pending:
        for pid in list(pending):
            try:
                got, _, ru = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by the client (its CPU is in the client's rusage)
                pending.discard(pid)
                continue
            if got:
                cpu += ru.ru_utime + ru.ru_stime
                left.append(pid)
                pending.discard(pid)
        if pending and time.time() > deadline:
            for pid in pending:
                os.kill(pid, signal.SIGTERM)  # a descendant of our client: ours to stop
            deadline = time.time() + 10
        time.sleep(0.1)
    return cpu, left


def run_tree(
    label: str,
    cmd: list[str],
    env: dict[str, str],
    workdir: Path,
    ref: RefServer,
    prefect: PrefectServer | None,
    timeout: float,
) -> dict[str, Any]:
    logf = open(workdir / f"{label}.log", "w")
    pf_cpu0 = prefect.cpu() if prefect else 0.0
    ref_cpu0 = tree_cpu(ref.ps)
    busy0 = system_busy()
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    mon = TreeMonitor(psutil.Process(proc.pid), ref, prefect)
    mon.start()

    def watchdog() -> None:
        if not mon.done.wait(timeout):
            log(f"{label}: over {timeout:.0f} s, sending SIGINT")
            proc.send_signal(signal.SIGINT)

    threading.Thread(target=watchdog, daemon=True).start()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    mon.done.set()
    mon.join()
    logf.close()
    orphans_cpu, orphans = reap_leftovers([p for p in mon.procs if p != proc.pid])
    tree_cpu_exact = ru.ru_utime + ru.ru_stime + orphans_cpu
    ref_stats = ref.stats()
    ref_cpu = tree_cpu(ref.ps) - ref_cpu0
    pf_cpu = (prefect.cpu() - pf_cpu0) if prefect else None
    ours = tree_cpu_exact + ref_cpu + (pf_cpu or 0.0)
    return {
        "label": label,
        "cmd": cmd,
        "returncode": proc.returncode,
        "wall": wall,
        "tree_cpu": tree_cpu_exact,
        "tree_cpu_user": ru.ru_utime,
        "tree_cpu_sys": ru.ru_stime,
        "tree_cpu_sampled": sum(mon.cpu.values()),
        "root_cpu_sampled": mon.cpu.get(proc.pid, 0.0),
        "orphans": orphans,
        "processes": mon.procs,
        "peak_tree_mb": mon.peak_tree / 2**20,
        "peak_root_mb": mon.peak_root / 2**20,
        "peak_children_mb": mon.peak_children / 2**20,
        "maxrss_single_mb": ru.ru_maxrss / 1024,
        "first_request_s": (mon.first_request - t0) if mon.first_request else None,
        "ref_stats": ref_stats,
        "ref_cpu": ref_cpu,
        "ref_peak_rss_mb": ref.peak_rss / 2**20,
        "prefect_cpu": pf_cpu,
        "prefect_peak_rss_mb": mon.peak_prefect / 2**20 if prefect else None,
        "other_cores": max(0.0, system_busy() - busy0 - ours) / wall if wall > 0 else 0.0,
        "series": mon.series,
    }


def count_images(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*.png") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


class PayloadBench:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.args = bench.args
        self.workdir = bench.workdir
        self.in_flight = self.args.in_flight
        self.timeout = self.args.timeout or 900
        self.ephemeral_home = self.workdir / "prefect-home-ephemeral"

    def ref(self, name: str) -> RefServer:
        return RefServer(self.workdir, name, "--latency", LATENCY, "--seed", "1")

    def base_env(self, ref: RefServer) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))}
        env.update(OPENAI_BASE_URL=ref.base_url, OPENAI_API_KEY=API_KEY, PYTHONUNBUFFERED="1")
        return env

    def prefect_env(self, ref: RefServer, prefect: PrefectServer | None) -> dict[str, str]:
        env = self.base_env(ref)
        env.update(PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_ANALYTICS_ENABLED="false")
        # Prefect's API (in-process or its temporary server) can take long to start on a busy
        # machine; the default 20 s made the run fail instead of being measured.
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
        if prefect is None:
            env["PREFECT_HOME"] = str(self.ephemeral_home)
        else:
            env.update(PREFECT_API_URL=prefect.api_url, PREFECT_HOME=str(prefect.home))
        return env

    def imagebatch_cmd(self, jobs: Path, out: Path) -> list[str]:
        return [PY, "-m", "imagebatch.cli", "run", str(jobs), "--out", str(out), "-q",
                "--max-in-flight", str(self.in_flight),
                *shlex.split(self.args.payload_flags)]  # fmt: skip

    def warm_up(self) -> None:
        """One unmeasured 4-job run of each client: file caches, and the ephemeral home's database."""
        jobs = make_jobs(self.workdir / "jobs-warmup.csv", 4)
        ref = self.ref("warmup")
        try:
            for label, cmd, env in (
                ("warmup-sdk", self.sdk_cmd(jobs, self.workdir / "warmup-sdk"), self.base_env(ref)),
                ("warmup-ephemeral", self.imagebatch_cmd(jobs, self.workdir / "warmup-eph"),
                 self.prefect_env(ref, None)),
            ):  # fmt: skip
                t0 = time.time()
                with open(self.workdir / f"{label}.log", "w") as logf:
                    rc = subprocess.run(
                        cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=300
                    ).returncode
                log(f"{label}: rc={rc} in {time.time() - t0:.1f} s")
        finally:
            ref.stop()
        for p in self.workdir.glob("warmup-*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def sdk_cmd(self, jobs: Path, out: Path) -> list[str]:
        return [PY, str(BENCH / "sdk_loop.py"), str(jobs), "--out", str(out),
                "--concurrency", str(self.in_flight)]  # fmt: skip

    def one(self, kind: str, jobs: Path) -> dict[str, Any]:
        out = self.workdir / f"payload-{kind}"
        shutil.rmtree(out, ignore_errors=True)
        prefect = self.bench.prefect_server() if kind == "server" else None
        ref = self.ref(f"payload-{kind}")
        try:
            if kind == "sdk":
                cmd, env = self.sdk_cmd(jobs, out), self.base_env(ref)
            else:
                cmd, env = self.imagebatch_cmd(jobs, out), self.prefect_env(ref, prefect)
            log(f"payload-{kind}: {shlex.join(cmd[1:])}  against  {ref.describe()}")
            commit = git_commit()
            res = run_tree(f"payload-{kind}", cmd, env, self.workdir, ref, prefect, self.timeout)
        finally:
            ref.stop()
        res.update(kind=kind, commit=commit, ref_desc=ref.describe())
        res["files"], res["bytes"] = count_images(out)
        if kind != "sdk":
            self.bench.commits.append(commit)
            res["run"] = read_run_json(out).get("counts")
        if not self.args.keep:
            shutil.rmtree(out, ignore_errors=True)
        log(
            f"payload-{kind}: rc={res['returncode']} wall {res['wall']:.1f} s, files {res['files']}, "
            f"peak tree RSS {res['peak_tree_mb']:.0f} MB, tree CPU {res['tree_cpu']:.1f} s"
        )
        return res

    def run(self) -> None:
        become_subreaper()
        n = self.args.jobs or 2000
        jobs = make_jobs(self.workdir / f"jobs-{n}.csv", n)
        kinds = self.args.payload_runs
        if "server" in kinds:
            self.bench.prefect_server()  # started before any measured run
        self.warm_up()
        results = {k: self.one(k, jobs) for k in kinds}
        self.report(n, results)

    # -- output

    def report(self, n: int, res: dict[str, dict[str, Any]]) -> None:
        kinds = list(res)
        names = {"sdk": "SDK loop", "ephemeral": "imagebatch, no server (in-process API)",
                 "server": "imagebatch + prefect server"}  # fmt: skip
        sdk = res.get("sdk")

        def row(label: str, fn: Any, target: str = "") -> tuple:
            return (label, *(fn(res[k]) for k in kinds), target)

        def ratio(key: str, extra: str | None = None) -> Any:
            def cell(r: dict[str, Any]) -> str:
                if sdk is None or r is sdk or not sdk[key]:
                    return "-"
                value = r[key] + ((r.get(extra) or 0.0) if extra else 0.0)
                x = value / sdk[key]
                return f"{x:.2f}x {'ok' if x <= TARGET_RATIO else 'MISS'}"

            return cell

        rows = [
            row("images OK (files on disk) / jobs", lambda r: f"{r['files']} / {n}"),
            row("data written", lambda r: f"{r['bytes'] / 1e9:.2f} GB"),
            row("peak RSS, whole client tree (MB)", lambda r: f"{r['peak_tree_mb']:.0f}"),
            row("  of which the client process / its children (peaks)",
                lambda r: f"{r['peak_root_mb']:.0f} / {r['peak_children_mb']:.0f}"),
            row("CPU time, whole client tree, user+sys (s)", lambda r: f"{r['tree_cpu']:.1f}"),
            row("  cross-check: psutil per-process sum (s)", lambda r: f"{r['tree_cpu_sampled']:.1f}"),
            row("  of which the client process / its children (psutil, s)",
                lambda r: f"{r['root_cpu_sampled']:.1f} / "
                f"{r['tree_cpu_sampled'] - r['root_cpu_sampled']:.1f}"),
            row("CPU ms per image written (tree)",
                lambda r: f"{1000 * r['tree_cpu'] / r['files']:.0f}" if r["files"] else "-"),
            row("wall (s)", lambda r: f"{r['wall']:.1f}"),
            row("start to first request at the server (s)",
                lambda r: "-" if r["first_request_s"] is None else f"{r['first_request_s']:.1f}"),
            row("**peak RSS vs SDK loop (tree)**", ratio("peak_tree_mb"), f"<= {TARGET_RATIO:.0f}x"),
            row("**CPU time vs SDK loop (tree)**", ratio("tree_cpu"), f"<= {TARGET_RATIO:.0f}x"),
            row("Prefect server (separate process): peak RSS MB / CPU s during run",
                lambda r: "-" if r["prefect_cpu"] is None
                else f"{r['prefect_peak_rss_mb']:.0f} / {r['prefect_cpu']:.1f}"),
            row("peak RSS vs SDK loop, client tree + Prefect server",
                ratio("peak_tree_mb", "prefect_peak_rss_mb")),
            row("CPU vs SDK loop, client tree + Prefect server", ratio("tree_cpu", "prefect_cpu")),
            row("processes in the client tree (incl. left behind)",
                lambda r: f"{len(r['processes'])} ({len(r['orphans'])})"),
            row("refserver: 200 / 429 / peak in flight",
                lambda r: f"{r['ref_stats']['ok']} / {r['ref_stats']['rate_limited']} / "
                f"{r['ref_stats']['peak_in_flight']}"),
            row("refserver CPU (s) / peak RSS (MB)",
                lambda r: f"{r['ref_cpu']:.1f} / {r['ref_peak_rss_mb']:.0f}"),
            row("other processes on the machine (cores, average)",
                lambda r: f"{r['other_cores']:.2f}"),
            row("client exit status", lambda r: str(r["returncode"])),
        ]  # fmt: skip
        head = ("metric", *(names[k] for k in kinds), "target")
        desc = (
            f"server: fresh `{res[kinds[0]]['ref_desc']}` per client (1024x1024 RGB PNGs of "
            f"{res[kinds[0]]['ref_stats']['png_bytes'][0] / 1e6:.2f} MB, 4.2 MB as base64); {n} "
            f"single-image jobs, {self.in_flight} in flight; SDK loop: `bench/sdk_loop.py JOBS "
            f"--out DIR --concurrency {self.in_flight}`; imagebatch: `imagebatch run JOBS --out DIR "
            f"-q --max-in-flight {self.in_flight}{' ' + self.args.payload_flags if self.args.payload_flags else ''}`, no server: no PREFECT_API_URL, Prefect's "
            "API served from the client's own process (own PREFECT_HOME, warmed by one unmeasured run), server: PREFECT_API_URL of the "
            "invocation's `prefect server start`. Peak RSS: largest psutil sum over the client "
            "and its descendants (0.2 s samples); CPU: os.wait4 with the driver as child "
            "subreaper (client + every descendant, exact)"
        )
        self.bench.report_raw(
            "payload",
            "7. Realistic payloads (3 MB PNGs) against the openai SDK loop",
            desc,
            _md_table(head, rows),
            extra=res,
            printable=[head, *rows],
        )
        (self.workdir / "payload-summary.json").write_text(json.dumps(res, indent=1, default=str))


def bench_payload(bench: Bench) -> None:
    PayloadBench(bench).run()
