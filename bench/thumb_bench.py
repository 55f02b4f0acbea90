"""Thumbnail CPU per image on a realistic 3 MB 1024x1024 PNG, old settings beside new.

    python bench/thumb_bench.py [--repeat 10]

Prints CPU ms per thumbnail (process time, so other processes on the machine do not count)
for a plain decode (the floor), the settings used before (Lanczos with reducing_gap 2.0,
WebP method 4) and the settings tasks/thumbs.py uses now (reducing_gap 1.0, method 0).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import refserver  # bench/refserver.py: the same noise PNGs as the payload bench


def _thumb(source: Path, gap: float, method: int) -> int:
    with Image.open(source) as img:
        img.thumbnail((256, 256), Image.Resampling.LANCZOS, reducing_gap=gap)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "WEBP", quality=80, method=method)
    return len(buf.getvalue())


def _decode(source: Path) -> int:
    with Image.open(source) as img:
        img.load()
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source.png"
        source.write_bytes(refserver.make_png(1, 3_000_000))
        print(f"source: {source.stat().st_size:,} bytes, 1024x1024 PNG")
        cases: dict[str, Callable[[], int]] = {
            "decode only (floor)": lambda: _decode(source),
            "before: reducing_gap 2.0, WebP method 4": lambda: _thumb(source, 2.0, 4),
            "now: reducing_gap 1.0, WebP method 0": lambda: _thumb(source, 1.0, 0),
        }
        for name, case in cases.items():
            started = time.process_time()
            for _ in range(args.repeat):
                size = case()
            ms = (time.process_time() - started) * 1000 / args.repeat
            print(f"| {name} | {ms:.1f} ms | {size:,} bytes |")


if __name__ == "__main__":
    main()
