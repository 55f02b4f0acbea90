"""The baseline: what a user would write in a notebook. asyncio + httpx + tenacity, fixed concurrency.

    python bench/naive.py JOBS.csv --out DIR --base-url URL [--concurrency 16] [--summary S.json]

One POST per row under an `asyncio.Semaphore(concurrency)`, retried with the OpenAI
cookbook's tenacity policy (random exponential backoff between 1 s and 60 s, 6 attempts)
on 429, 5xx and transport errors, then the b64 image is decoded and written to
DIR/<id>.png. No limiter, no journal, no fsync, no Prefect. `--no-retry` and
`--concurrency 64` make it the "bare asyncio + httpx loop" of the overhead benchmark.

The summary JSON has counts (succeeded, failed, 429s and 5xx seen), the loop's wall time
and each image's finish time (epoch seconds), so the driver can compute the same steady
state rate as for imagebatch.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import json
import os
import sys
import time
from pathlib import Path

import httpx
import tenacity


class HttpError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, HttpError):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, httpx.TransportError)


async def main_async(args: argparse.Namespace) -> dict:
    with open(args.jobs, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {
        "succeeded": 0,
        "failed": 0,
        "http_429": 0,
        "http_5xx": 0,
        "transport_errors": 0,
        "requests": 0,
    }
    finished: list[float] = []
    sem = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    timeout = httpx.Timeout(360.0, connect=10.0)
    headers = {"Authorization": f"Bearer {args.api_key}"}

    async with httpx.AsyncClient(
        base_url=args.base_url.rstrip("/") + "/", headers=headers, limits=limits, timeout=timeout
    ) as client:

        async def call(row: dict) -> bytes:
            counts["requests"] += 1
            body = {
                "model": row.get("model") or args.model,
                "prompt": row["prompt"],
                "n": 1,
                "size": row.get("size") or args.size,
            }
            try:
                r = await client.post("images/generations", json=body)
            except httpx.TransportError:
                counts["transport_errors"] += 1
                raise
            if r.status_code == 429:
                counts["http_429"] += 1
            elif r.status_code >= 500:
                counts["http_5xx"] += 1
            if r.status_code >= 400:
                raise HttpError(r.status_code, r.text)
            return base64.b64decode(r.json()["data"][0]["b64_json"])

        if args.no_retry:
            policy = None
        else:
            policy = dict(
                retry=tenacity.retry_if_exception(_retryable),
                wait=tenacity.wait_random_exponential(min=1, max=60),
                stop=tenacity.stop_after_attempt(args.max_attempts),
                reraise=True,
            )

        async def one(row: dict) -> None:
            async with sem:
                try:
                    if policy is None:
                        data = await call(row)
                    else:
                        data = await tenacity.AsyncRetrying(**policy)(call, row)
                except Exception:
                    counts["failed"] += 1
                    return
                (out / f"{row['id']}.png").write_bytes(data)
                counts["succeeded"] += 1
                finished.append(time.time())

        started = time.time()
        await asyncio.gather(*(one(row) for row in rows))
        seconds = time.time() - started
    return {
        "jobs": len(rows),
        "concurrency": args.concurrency,
        "loop_seconds": seconds,
        "loop_started": started,
        **counts,
        "finished_at": finished,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("jobs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", ""))
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "sk-bench"))
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-attempts", type=int, default=6)
    ap.add_argument("--no-retry", action="store_true")
    ap.add_argument("--model", default="gpt-image-2")
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--summary", help="write the summary JSON here (default: stdout)")
    args = ap.parse_args(argv)
    if not args.base_url:
        ap.error("--base-url or OPENAI_BASE_URL is required")
    summary = asyncio.run(main_async(args))
    text = json.dumps(summary)
    if args.summary:
        Path(args.summary).write_text(text)
    else:
        print(text)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
