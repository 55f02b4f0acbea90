"""The simplest script: the official `openai` SDK, a semaphore of 64, every image written to disk.

    OPENAI_BASE_URL=... OPENAI_API_KEY=... python bench/sdk_loop.py JOBS.csv --out DIR [--concurrency 64]

The baseline of `run_bench.py payload`: what a user writes before reaching for a tool. It reads
the same jobs CSV as imagebatch (id, prompt, model, size), decodes each `b64_json` and writes
DIR/<id>.png; the SDK's own retries (2) and timeouts are left at their defaults. Prints one
JSON line of counts at the end.
"""

import argparse
import asyncio
import base64
import csv
import json
from pathlib import Path

from openai import AsyncOpenAI


async def main(args: argparse.Namespace) -> dict[str, int]:
    with open(args.jobs, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    client = AsyncOpenAI()
    sem = asyncio.Semaphore(args.concurrency)
    counts = {"succeeded": 0, "failed": 0}

    async def one(row: dict[str, str]) -> None:
        async with sem:
            try:
                r = await client.images.generate(
                    model=row["model"], prompt=row["prompt"], size=row["size"], n=1
                )
                (out / f"{row['id']}.png").write_bytes(base64.b64decode(r.data[0].b64_json))
                counts["succeeded"] += 1
            except Exception as exc:  # a failed image is counted, the rest go on
                counts["failed"] += 1
                print(f"{row['id']}: {exc!r}"[:300], flush=True)

    await asyncio.gather(*(one(r) for r in rows))
    await client.close()
    return counts


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("jobs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--concurrency", type=int, default=64)
    print(json.dumps(asyncio.run(main(ap.parse_args()))), flush=True)
