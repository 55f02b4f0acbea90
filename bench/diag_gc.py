"""Diagnostic only: the imagebatch CLI with Python's cyclic garbage collector watched.

    BENCH_GC=collect python bench/diag_gc.py run JOBS.csv --out DIR -q   (gc.collect() every second)
    BENCH_GC=inspect BENCH_GC_OUT=F.txt python bench/diag_gc.py run ...  (what cycles hold)

`collect`: if peak RSS falls a lot, large buffers were kept alive only by reference cycles
until a full collection. `inspect`: every 5 s, collect with DEBUG_SAVEALL and write to
BENCH_GC_OUT each buffer over 256 KB held only by unreachable objects, with the chain of
unreachable objects above it (types, and qualnames of frames/functions), then drop the garbage. It
changes nothing in the package.
"""

from __future__ import annotations

import collections
import gc
import os
import sys
import threading
import time
import types

BIG = 256 * 1024


def _describe(o: object) -> str:
    if isinstance(o, types.FrameType):
        return f"frame {o.f_code.co_qualname} ({o.f_code.co_filename.rsplit('/', 2)[-2:]})"
    if isinstance(o, types.CoroutineType):
        return f"coroutine {o.__qualname__}"
    if isinstance(o, types.TracebackType):
        return "traceback"
    if isinstance(o, BaseException):
        return f"exception {type(o).__name__}"
    if isinstance(o, dict):
        return f"dict keys={list(o)[:6]}"
    return type(o).__module__ + "." + type(o).__qualname__


def _inspect(out: str) -> None:
    while True:
        time.sleep(5)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        gc.set_debug(0)
        garbage = list(gc.garbage)
        gc.garbage.clear()
        ids = {id(o) for o in garbage}
        chains: collections.Counter[str] = collections.Counter()
        total = 0
        seen: set[int] = set()
        for holder in garbage:
            for o in gc.get_referents(holder):
                if not isinstance(o, (bytes, bytearray, str)) or len(o) <= BIG or id(o) in seen:
                    continue
                seen.add(id(o))
                total += len(o)
                chain, cur = [f"{type(o).__name__}", _describe(holder)], holder
                for _ in range(8):
                    refs = [r for r in gc.get_referrers(cur) if id(r) in ids and r is not garbage]
                    if not refs:
                        break
                    cur = refs[0]
                    chain.append(_describe(cur))
                chains[" <- ".join(chain)] += 1
        with open(out, "a") as f:
            f.write(
                f"{time.time():.0f} unreachable objects {len(garbage)}, big buffers {total / 2**20:.0f} MB\n"
            )
            for chain, n in chains.most_common(8):
                f.write(f"  {n} x {chain}\n")
        del garbage


mode = os.environ.get("BENCH_GC", "")
if mode == "collect":
    threading.Thread(
        target=lambda: [time.sleep(1) or gc.collect() for _ in iter(int, 1)], daemon=True
    ).start()
elif mode == "inspect":
    threading.Thread(target=_inspect, args=(os.environ["BENCH_GC_OUT"],), daemon=True).start()

from imagebatch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
