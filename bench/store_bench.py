"""Per-image memory and CPU of the response path (receive, parse, check, write, hash), two
versions of the code side by side against the same realistic answers.

    python bench/store_bench.py --before REV [--images 40] [--in-flight 16] [--record]

Starts bench/refserver.py (stdlib, its own process: its CPU is not counted) with no latency,
serving 1024x1024 RGB PNGs of about 3 MB (4 MB as base64). For each version, in a fresh
process: the public client (`ImagesClient.send`) and store (`ImageStore.stage` + `commit`)
do what the dispatcher does with each answer, and the process measures

- CPU ms per image: process CPU time (every thread) over `--images` answers one at a time;
- store CPU ms per image: `ImageStore.stage` alone on the same bytes (check, write, hash);
- tracemalloc peak per image: Python-level allocations (bytes, str, buffers) while one answer
  is received and stored; Pillow's own pixel buffers are not seen by tracemalloc;
- RSS per answer in flight: growth of peak RSS while `--in-flight` answers are received and
  stored at once (four rounds), over that number: what really scales with concurrency.

`--before REV` runs REV's code from a `git worktree` by putting a package layout of it first
on PYTHONPATH; "after" is the working tree (the editable install). Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-store-bench-0123456789"


def _units(count: int) -> list:  # type: ignore[type-arg]
    import pandas as pd

    from imagebatch.configs.registry import Registry
    from imagebatch.configs.settings import JobDefaults
    from imagebatch.tasks.plan import plan_jobs, units_for
    from imagebatch.tasks.read_jobs import read_jobs
    from imagebatch.tasks.validate import Validator

    rows = [
        {"prompt": f"bench {i}", "model": "gpt-image-1", "size": "1024x1024", "quality": "low"}
        for i in range(count)
    ]
    checked = Validator(Registry.load(), JobDefaults(), targets_openai=False).check(
        read_jobs(pd.DataFrame(rows))
    )
    return [u for p in plan_jobs(checked.valid) for u in units_for(p, range(p.job.n))]


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _measure(base_url: str, out: Path, images: int, in_flight: int) -> dict[str, float]:
    from imagebatch.configs.settings import ApiSettings
    from imagebatch.tasks import store as store_mod
    from imagebatch.tasks.api_client import ImagesClient

    off_loop = getattr(store_mod, "run_off_loop", None)  # the new pool, or the default one

    async def run(func, *args):  # type: ignore[no-untyped-def]
        return await (off_loop(func, *args) if off_loop else asyncio.to_thread(func, *args))

    store = store_mod.ImageStore(out)
    store.prepare()
    units = _units(images * 2 + in_flight * 4 + 12)
    client = ImagesClient(ApiSettings(base_url=base_url, api_key=KEY), max_connections=64)
    counter = iter(range(10**9))

    async def one(unit) -> bytes:  # type: ignore[no-untyped-def]
        """What dispatch does with one answer: send, stage each image, commit; returns the
        last image's bytes (for the store-only measurement)."""
        result = await client.send(unit)
        last = b""
        for image in result.images:
            last = image.data
            stored = await run(store.stage, image.data, f"img{next(counter)}", None)
            await run(store.commit, stored)
        return last

    todo = iter(units)
    for _ in range(2):  # warm-up: imports, connections, allocator
        sample = await one(next(todo))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(images):
        await one(next(todo))
    cpu_ms = (time.process_time() - cpu0) * 1000 / images
    wall_ms = (time.perf_counter() - wall0) * 1000 / images

    cpu0 = time.process_time()
    for i in range(images):
        stored = store.stage(sample, f"only{i}", None)
        store.commit(stored)
    store_ms = (time.process_time() - cpu0) * 1000 / images

    rss0 = _rss_peak_mb()
    for _ in range(4):
        await asyncio.gather(*(one(next(todo)) for _ in range(in_flight)))
    rss_per = (_rss_peak_mb() - rss0) / in_flight

    tracemalloc.start()
    peaks = []
    for _ in range(5):
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        await one(next(todo))
        peaks.append((tracemalloc.get_traced_memory()[1] - base) / 1e6)
    tracemalloc.stop()
    await client.aclose()
    return {
        "image_bytes": len(sample),
        "cpu_ms_per_image": cpu_ms,
        "wall_ms_per_image": wall_ms,
        "store_cpu_ms_per_image": store_ms,
        "tracemalloc_peak_mb_per_image": statistics.median(peaks),
        "rss_mb_per_answer_in_flight": rss_per,
        "rss_peak_mb": _rss_peak_mb(),
    }


def _child(args: argparse.Namespace) -> int:
    out = Path(tempfile.mkdtemp(prefix="store-bench-"))
    try:
        figures = asyncio.run(_measure(args.base_url, out, args.images, args.in_flight))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(figures))
    return 0


def _layout(rev: str, work: Path) -> Path:
    """A package tree of `rev` that imports as `imagebatch` (tasks, configs, flows inside)."""
    tree = work / f"tree-{rev}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
        check=True,
        capture_output=True,
    )
    pkg = work / f"pkg-{rev}" / "imagebatch"
    pkg.mkdir(parents=True)
    for entry in (tree / "imagebatch").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for name in ("tasks", "configs", "flows"):
        (pkg / name).symlink_to(tree / name)
    return pkg.parent


def _run_version(label: str, pythonpath: Path | None, args: argparse.Namespace, url: str) -> dict:  # type: ignore[type-arg]
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [sys.executable, __file__, "--child", "--base-url", url]
    cmd += ["--images", str(args.images), "--in-flight", str(args.in_flight)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(before: dict, after: dict, rev: str, head: str) -> str:  # type: ignore[type-arg]
    rows = [
        ("CPU ms per image (receive, parse, check, write, hash, rename)", "cpu_ms_per_image"),
        ("store CPU ms per image (`ImageStore.stage` alone)", "store_cpu_ms_per_image"),
        ("wall ms per image, one at a time (latency 0)", "wall_ms_per_image"),
        ("tracemalloc peak MB per image (Python objects only)", "tracemalloc_peak_mb_per_image"),
        ("peak RSS MB per answer in flight", "rss_mb_per_answer_in_flight"),
        ("peak RSS MB of the process", "rss_peak_mb"),
    ]
    lines = [f"| per image | before ({rev}) | after ({head}) |", "|---|---|---|"]
    for name, key in rows:
        lines.append(f"| {name} | {before[key]:.1f} | {after[key]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="", help="git revision to compare with (default: none)")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    work = Path(tempfile.mkdtemp(prefix="store-bench-work-"))
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "refserver.py"), "--port", "0", "--latency", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        found = re.search(r"listening on (\S+)", server.stdout.readline())
        if not found:
            raise SystemExit("refserver did not start")
        url = found.group(1)
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        before = (
            _run_version("before", _layout(args.before, work), args, url) if args.before else None
        )
        after = _run_version("after", None, args, url)
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
    print(json.dumps({"before": before, "after": after}, indent=1))
    if before is not None:
        table = _table(before, after, args.before, head)
        print(table)
        if args.record:
            command = "python bench/store_bench.py " + " ".join(a for a in (argv or sys.argv[1:]))
            with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
                f.write(
                    f"\n\n## Store path: per-image memory and CPU, before and after "
                    f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
                    f"`{command}` (image of {after['image_bytes'] / 1e6:.2f} MB)\n\n{table}\n"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
