"""`run_bench.py discovery`: an unknown limit without headers, three runs (issue 13).

Issue 13's measurement: bench/refserver.py limited to 300 images per minute (a token
bucket of a minute's images, full at start, no `x-ratelimit-*` headers, 429s saying only
"Limit 300 ... try again in Nms" in their message), 600 single-image jobs, imagebatch not
told the limit. Targets: under 5 % of requests answered 429 and 0.85 of the limit reached
within two minutes, in three runs out of three. Each run gets a fresh refserver (seed = run
number) and the invocation's `prefect server start`; the runs go one after the other.

The limit binds only if the client outruns the bucket (more than 300 + 5 x t images by t
seconds); a client slowed by a loaded machine never meets it, which the "first 429" row
shows. `--ref-flags "--png-mb 0.3"` serves smaller PNGs, so the client's CPU is not what
binds and discovery is exercised whatever the load. The client adopts a limit a 429's message
states; `--ref-flags "--no-stated-limit"` leaves it out, so only the limiter's own discovery
(slow start, the bounded first decrease, probing) is measured.

"Reached 0.85 of the limit": the first moment, counted from the first request the server
saw, when the images billed in the 60 s before it reach 0.85 x 300 (polled every second,
interpolated between polls).
"""

from __future__ import annotations

import os
import shlex
from typing import TYPE_CHECKING, Any

from payload_bench import RefServer
from run_bench import _md_table, interp, log, make_jobs, tree_cpu

if TYPE_CHECKING:
    from run_bench import Bench

IPM = 300
JOBS = 600
REACH_SHARE = 0.85
REACH_WITHIN = 120.0
MAX_429_SHARE = 0.05


class _Ref(RefServer):
    """The refserver as run_bench's Monitor samples a simulator (stats and CPU)."""

    def cpu(self) -> float:
        return tree_cpu(self.ps)


def reach_time(samples: list[dict[str, Any]], ipm: float, share: float) -> float | None:
    """Seconds from the first request seen until `share` x `ipm` images were billed within
    the preceding 60 s (None: never)."""
    seen = [s["t"] for s in samples if s.get("seen")]
    if not seen:
        return None
    start = seen[0]
    for s in samples:
        t = s["t"]
        if t < start:
            continue
        if (s.get("billed") or 0) - interp(samples, "billed", t - 60.0) >= share * ipm:
            return t - start
    return None


def first_429(samples: list[dict[str, Any]]) -> float | None:
    """Seconds from the first request seen to the first poll that saw a 429."""
    seen = [s["t"] for s in samples if s.get("seen")]
    hits = [s["t"] for s in samples if s.get("rate_limited")]
    return hits[0] - seen[0] if seen and hits else None


def one_run(bench: Bench, i: int, jobs_csv: Any, jobs: int) -> dict[str, Any]:
    """One fresh refserver and one `imagebatch run` against it; the figures of this run."""
    label = f"discovery-{i}"
    load = os.getloadavg()[0]
    extra = shlex.split(bench.args.ref_flags or "")
    ref = _Ref(bench.workdir, label, "--ipm", str(IPM), "--seed", str(i), *extra)
    try:
        res = bench.imagebatch(label, ref, jobs_csv, [], bench.args.timeout or 900)
    finally:
        ref.stop()
    st = res["sim_stats"]
    seen, refused = st.get("requests_seen") or 0, st.get("rate_limited") or 0
    limiter = (res["run"].get("stats") or {}).get("limiter") or {}
    return {
        "label": label,
        "server": ref.describe(),
        "load_before": load,
        "seen": seen,
        "refused": refused,
        "share": refused / seen if seen else None,
        "reach": reach_time(res["samples"], IPM, REACH_SHARE),
        "first_429": first_429(res["samples"]),
        "ok": (res["run"].get("counts") or {}).get("succeeded", 0),
        "jobs": jobs,
        "wall": res["wall"],
        "cpu": res["cpu"],
        "other": res["other_cores"],
        "limiter": {
            k: limiter.get(k) for k in ("ipm_estimate", "pauses", "rate_limited", "peak_in_flight")
        },
        "commit": res["commit"],
    }


def _rows(runs: list[dict[str, Any]]) -> list[tuple]:
    def pct(r: dict[str, Any]) -> str:
        return (
            f"{r['refused']} / {r['seen']} = {100 * r['share']:.2f} %"
            if r["share"] is not None
            else "-"
        )

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} s"

    share_ok = sum(1 for r in runs if r["share"] is not None and r["share"] < MAX_429_SHARE)
    reach_ok = sum(1 for r in runs if r["reach"] is not None and r["reach"] <= REACH_WITHIN)
    done_ok = sum(1 for r in runs if r["ok"] == r["jobs"])
    n = len(runs)

    def verdict(k: int) -> str:
        return f"{k}/{n} {'ok' if k == n else 'MISS'}"

    lim = [r["limiter"] for r in runs]
    return [
        ("429s / requests", *(pct(r) for r in runs), "< 5 %", verdict(share_ok)),
        (
            "0.85 of the limit billed within 60 s, reached at",
            *(sec(r["reach"]) for r in runs),
            "<= 120 s",
            verdict(reach_ok),
        ),
        ("succeeded / jobs", *(f"{r['ok']} / {r['jobs']}" for r in runs), "all", verdict(done_ok)),
        ("first 429 seen at", *(sec(r["first_429"]) for r in runs), "", ""),
        ("wall time of the client process", *(f"{r['wall']:.0f} s" for r in runs), "", ""),
        (
            "limiter end state: ipm estimate / pauses / peak in flight",
            *(f"{_num(x['ipm_estimate'])} / {x['pauses']} / {x['peak_in_flight']}" for x in lim),
            "",
            "",
        ),
        ("client CPU", *(f"{r['cpu']:.0f} s" for r in runs), "", ""),
        (
            "load average before the run / other processes during it (cores)",
            *(f"{r['load_before']:.2f} / {r['other']:.2f}" for r in runs),
            "",
            "",
        ),
    ]


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}"


def bench_discovery(bench: Bench) -> None:
    """Three runs of issue 13's unknown-limit measurement, one table."""
    jobs = bench.args.jobs or JOBS
    jobs_csv = make_jobs(bench.workdir / f"jobs-{jobs}.csv", jobs)
    runs = []
    for i in range(1, (bench.args.runs or 3) + 1):
        runs.append(one_run(bench, i, jobs_csv, jobs))
        r = runs[-1]
        log(f"{r['label']}: 429s {r['refused']}/{r['seen']}, reach {r['reach']}, ok {r['ok']}")
    head = ("metric", *(f"run {i + 1}" for i in range(len(runs))), "target", "ok")
    rows = _rows(runs)
    desc = (
        f"`{runs[0]['server']}` (latency uniform:1,3; a fresh server per run, seed = run "
        f"number); {jobs} single-image jobs; client: `imagebatch run jobs.csv "
        "--out DIR -q` (not told the limit), one run after the other, real Prefect server"
    )
    bench.report_raw(
        "discovery",
        "Unknown limit without headers: discovery, three runs (issue 13)",
        desc,
        _md_table(head, rows),
        extra={"runs": runs},
        printable=[head, *rows],
    )
