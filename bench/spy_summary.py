"""Summarise a py-spy `--format raw` profile (collapsed stacks), as written by `run_bench.py --profile`.

    python bench/spy_summary.py PROFILE.txt                 # top functions, inclusive share
    python bench/spy_summary.py PROFILE.txt --under NAME     # what NAME spends its time in
    python bench/spy_summary.py PROFILE.txt --callers NAME   # who calls NAME
    python bench/spy_summary.py PROFILE.txt --categories     # shares by stage, idle left out

`run_bench.py --profile` records with `--gil`, so shares are of the time the client held
the GIL (its Python CPU), idle waits excluded.
"""

from __future__ import annotations

import argparse
import collections
import re

_LINE = re.compile(r":\d+\)$")


def stacks(path: str):
    with open(path) as f:
        for line in f:
            line = line.rstrip()
            if not line:
                continue
            stack, _, n = line.rpartition(" ")
            yield [_LINE.sub(")", fr) for fr in stack.split(";")], int(n)


# First match wins. A profile recorded without --gil samples every thread, including ones
# blocked in C (a worker waiting on its queue, the selector), so those leaves are left out.
CATEGORIES = (
    ("thumbnails (tasks/thumbs.py)", "tasks/thumbs.py"),
    ("imports", "_find_and_load"),
    ("Prefect engine, client, artifacts", "prefect/"),
    ("store: check, write, hash (tasks/store.py)", "tasks/store.py"),
    ("network read (httpcore, h11, anyio)", "httpcore/"),
    ("JSON parse", "json/"),
    ("response handling, base64 (tasks/api_client.py)", "tasks/api_client.py"),
    ("journal", "tasks/journal.py"),
    ("manifest, gallery, report", ("tasks/manifest.py", "tasks/gallery", "tasks/report.py")),
    ("httpx", "httpx/"),
    ("asyncio loop", "asyncio/"),
)
IDLE = ("_worker (", "Condition.wait", "EpollSelector.select", "heartbeat_loop", "Event.wait")


def categories(data: list) -> None:
    counts: collections.Counter[str] = collections.Counter()
    busy = 0
    for frames, n in data:
        if not frames or frames[-1].startswith(IDLE):
            continue
        busy += n
        joined = ";".join(frames)
        for name, keys in CATEGORIES:
            if any(k in joined for k in ((keys,) if isinstance(keys, str) else keys)):
                counts[name] += n
                break
        else:
            counts["other"] += n
    total = sum(n for _, n in data) or 1
    print(f"{total} samples, {busy} not idle ({busy / total:.0%}); shares of the not-idle samples:")
    for name, n in counts.most_common():
        print(f"{n / (busy or 1):6.1%}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--under", help="break down the time inside the first frame starting with this")
    ap.add_argument("--callers", help="show the callers of the first frame starting with this")
    ap.add_argument(
        "--categories",
        action="store_true",
        help="shares by stage (thumbnails, Prefect, network, store, ...), idle waits left out",
    )
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    data = list(stacks(args.profile))
    if args.categories:
        categories(data)
        return
    total = sum(n for _, n in data) or 1
    counter: collections.Counter[str] = collections.Counter()
    matched = 0
    for frames, n in data:
        if args.under or args.callers:
            name = args.under or args.callers
            idx = next((i for i, fr in enumerate(frames) if fr.startswith(name)), None)
            if idx is None:
                continue
            matched += n
            if args.under:
                key = " > ".join(frames[idx + 1 : idx + 1 + args.depth]) or "<self>"
            else:
                key = " < ".join(reversed(frames[max(0, idx - args.depth) : idx])) or "<root>"
            counter[key] += n
        else:
            for fr in set(frames):
                counter[fr] += n
    print(
        f"{total} samples"
        + (f"; {matched / total:.1%} under the selected frame" if matched else "")
    )
    for key, n in counter.most_common(args.top):
        print(f"{n / total:6.1%}  {key}")


if __name__ == "__main__":
    main()
