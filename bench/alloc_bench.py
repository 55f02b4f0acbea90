"""CPU and page faults of one image's buffers, with glibc's defaults and with tasks/memory.py.

    python bench/alloc_bench.py [--images 100]

Runs the response path of a 3 MB PNG answer (fill a body buffer in 64 KB chunks, decode it
to text, parse the JSON, decode the base64, check the image) over and over in a fresh
process per setting, and prints CPU ms per image (user, system) and minor page faults per
image. The work is the same in both; only where the allocator takes the buffers from differs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _work(images: int, tuned: bool) -> dict[str, float]:
    import base64

    import pybase64
    import refserver  # the payload bench's noise PNGs

    from imagebatch.tasks import memory
    from imagebatch.tasks.store import check_image

    if tuned:
        memory.tune_for_run()
    png = refserver.make_png(1, 3_000_000)
    answer = json.dumps({"created": 1, "data": [{"b64_json": base64.b64encode(png).decode()}]})
    raw = answer.encode()
    chunks = [raw[i : i + 65536] for i in range(0, len(raw), 65536)]

    def one() -> None:
        body, filled = bytearray(len(raw)), 0
        for chunk in chunks:
            body[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        text = body.decode("utf-8")
        body.clear()
        parsed = json.loads(text)
        del text
        check_image(pybase64.b64decode(parsed["data"][0].pop("b64_json"), validate=True))

    for _ in range(5):
        one()
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    for _ in range(images):
        one()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_ms": (time.process_time() - started) * 1000 / images,
        "user_ms": (after.ru_utime - before.ru_utime) * 1000 / images,
        "sys_ms": (after.ru_stime - before.ru_stime) * 1000 / images,
        "faults": (after.ru_minflt - before.ru_minflt) / images,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_work(args.images, args.child == "tuned")))
        return
    print("| allocator | CPU ms per image | user / system ms | page faults per image |")
    print("|---|---|---|---|")
    for setting in ("default", "tuned"):
        cmd = [sys.executable, __file__, "--images", str(args.images), "--child", setting]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        r = json.loads(subprocess.run(cmd, env=env, capture_output=True, check=True).stdout)
        name = "glibc defaults" if setting == "default" else "tasks/memory.py tune_for_run"
        print(
            f"| {name} | {r['cpu_ms']:.1f} | {r['user_ms']:.1f} / {r['sys_ms']:.1f} "
            f"| {r['faults']:.0f} |"
        )


if __name__ == "__main__":
    main()
