"""An independent Images API reference server with realistic payloads (bench use only).

    python bench/refserver.py --port 0 [--latency uniform:1,3] [--ipm 300] [--png-mb 3.0]

Not the project's simulator: stdlib only (asyncio streams, zlib), so a bench that compares
imagebatch with the official SDK measures both against a server neither of them ships.
It answers `POST /v1/images/generations` the way the real API answers a GPT image model:
`created`, `data[].b64_json`, the `background`/`output_format`/`size`/`quality` echoes and
`usage`, with 1024x1024 RGB PNGs of about 3 MB each (about 4 MB as base64). A handful of
distinct noise PNGs are made at start-up (about 1 s each) and served in turn, so no client
can cache a body; they are entropy-coded and filtered like a real PNG, so decoding one costs
about what a real one does (~15 ms), not a stored-block copy.

- `--latency`: seconds per answer, `uniform:LO,HI` or a number (default uniform:1,3).
- `--ipm N`: an images-per-minute limit (token bucket of `N * burst_seconds / 60` images,
  refilled continuously, full at start). Over it: 429 with an OpenAI-shaped
  `rate_limit_exceeded` body and no `x-ratelimit-*` headers (so a client must learn the
  limit from 429s); `--retry-after` adds `retry-after`/`retry-after-ms` to 429s.
- `GET /v1/models`, and `GET /_ref/stats` for the bench driver (counts, in flight, bytes).

Prints `listening on http://127.0.0.1:PORT/v1` on stdout once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field

SIDE = 1024
# Output tokens of one 1024x1024 image (openai-images-api.md / configs/prices.toml);
# `auto` is answered as medium, and echoed as such.
OUTPUT_TOKENS = {
    "gpt-image-2": {"low": 196, "medium": 1756, "high": 7024},
    "gpt-image-1": {"low": 272, "medium": 1056, "high": 4160},
}
MODELS = ("gpt-image-2", "gpt-image-1.5", "gpt-image-1", "gpt-image-1-mini")


# Maps uniform random bytes onto 200 values, some twice as likely: about 7.6 bits per byte,
# so deflate really Huffman-codes the data (a decoder does the work a real PNG asks for)
# while the file stays near raw size, as a detailed 1024x1024 image does.
_SKEW = bytes(i if i < 200 else (i - 200) * 3 % 200 for i in range(256))


def make_png(seed: int, target_bytes: int) -> bytes:
    """A 1024x1024 RGB PNG of about target_bytes (at most ~3 MB): noise rows, then flat rows.

    Rows use PNG's Sub filter, so decoding also runs the unfilter step (not a stored copy)."""
    rng = random.Random(seed)

    def noise_row() -> bytes:
        return b"\x01" + rng.randbytes(SIDE * 3).translate(_SKEW)

    sample = b"".join(noise_row() for _ in range(64))
    per_row = len(zlib.compress(sample, 6)) / 64
    noise_rows = max(1, min(SIDE, round(target_bytes / per_row)))
    flat = b"\x01" + bytes(SIDE * 3)
    raw = b"".join(noise_row() if y < noise_rows else flat for y in range(SIDE))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", SIDE, SIDE, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


@dataclass
class Stats:
    requests_seen: int = 0
    ok: int = 0
    rate_limited: int = 0
    errors: int = 0
    images_billed: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    bytes_sent: int = 0
    started: float = field(default_factory=time.time)


class Bucket:
    """Images-per-minute token bucket; `take` says how long until `n` would fit, or 0 if taken."""

    def __init__(self, ipm: int, burst_seconds: float) -> None:
        self.rate = ipm / 60.0
        self.capacity = max(1.0, ipm * burst_seconds / 60.0)
        self.tokens = self.capacity
        self.at = time.monotonic()

    def take(self, n: int) -> float:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


class RefServer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.latency = parse_latency(args.latency)
        self.bucket = Bucket(args.ipm, args.burst_seconds) if args.ipm > 0 else None
        target = int(args.png_mb * 1_000_000)
        self.images = [
            base64.b64encode(make_png(args.seed * 1000 + i, target)) for i in range(args.images)
        ]
        self.png_sizes = [len(base64.b64decode(b)) for b in self.images]
        self.next_image = 0
        self.stats = Stats()

    # -- HTTP/1.1 with keep-alive, Content-Length bodies only

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    await self.send(
                        writer, 411, error("Content-Length required", "invalid_request_error")
                    )
                    return
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                await self.route(writer, method, path.split("?", 1)[0], headers, body)
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        parts: list[bytes],
        extra: dict[str, str] | None = None,
    ) -> None:
        size = sum(len(p) for p in parts)
        reason = {
            200: "OK",
            400: "Bad Request",
            401: "Unauthorized",
            404: "Not Found",
            411: "Length Required",
            429: "Too Many Requests",
        }.get(status, "Error")
        hdrs = {
            "content-type": "application/json",
            "content-length": str(size),
            "x-request-id": f"req_{self.rng.getrandbits(64):016x}",
            "openai-version": "2020-10-01",
            **(extra or {}),
        }
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        writer.write(head.encode("latin-1") + b"\r\n")
        for p in parts:  # the b64 image goes out as its own buffer, not copied into a body
            writer.write(p)
        await writer.drain()
        self.stats.bytes_sent += size

    async def route(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        if method == "GET" and path == "/_ref/stats":
            await self.send(writer, 200, [json.dumps(self.stats_json()).encode()])
        elif not headers.get("authorization", "").startswith("Bearer "):
            await self.send(
                writer,
                401,
                error(
                    "You didn't provide an API key.",
                    "invalid_request_error",
                    code="invalid_api_key",
                ),
            )
        elif method == "GET" and path == "/v1/models":
            data = [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "system"}
                for m in MODELS
            ]
            await self.send(writer, 200, [json.dumps({"object": "list", "data": data}).encode()])
        elif method == "POST" and path == "/v1/images/generations":
            await self.generate(writer, body)
        else:
            await self.send(
                writer, 404, error(f"Invalid URL ({method} {path})", "invalid_request_error")
            )

    async def generate(self, writer: asyncio.StreamWriter, body: bytes) -> None:
        st = self.stats
        st.requests_seen += 1
        try:
            req = json.loads(body)
            prompt, n = str(req["prompt"]), int(req.get("n") or 1)
            quality = str(req.get("quality") or "auto")
            if not prompt or not 1 <= n <= 10:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            st.errors += 1
            await self.send(writer, 400, error("Invalid request body.", "invalid_request_error"))
            return
        model = str(req.get("model") or "gpt-image-2")
        wait = self.bucket.take(n) if self.bucket else 0.0
        if wait > 0:
            st.rate_limited += 1
            stated = "" if self.args.no_stated_limit else f"Limit {self.args.ipm}, "
            msg = (
                f"Rate limit reached for {model} in organization org-bench on images per min "
                f"(IPM): {stated}Requested {n}. Please try again in {wait * 1000:.0f}ms."
            )
            extra = (
                {"retry-after": str(max(1, round(wait))), "retry-after-ms": str(round(wait * 1000))}
                if self.args.retry_after
                else {}
            )
            await self.send(writer, 429, error(msg, "images", code="rate_limit_exceeded"), extra)
            return
        st.in_flight += 1
        st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
        t0 = time.monotonic()
        try:
            await asyncio.sleep(self.latency(self.rng))
            parts = self.payload(model, n, quality, len(prompt))
            ms = str(round((time.monotonic() - t0) * 1000))
            await self.send(writer, 200, parts, {"openai-processing-ms": ms})
            st.ok += 1
            st.images_billed += n
        finally:
            st.in_flight -= 1

    def payload(self, model: str, n: int, quality: str, prompt_chars: int) -> list[bytes]:
        parts = [b'{"created": %d, "data": [' % int(time.time())]
        for i in range(n):
            parts += [
                b', {"b64_json": "' if i else b'{"b64_json": "',
                self.images[self.next_image],
                b'"}',
            ]
            self.next_image = (self.next_image + 1) % len(self.images)
        text = max(1, prompt_chars // 4)
        quality = quality if quality in ("low", "medium", "high") else "medium"
        table = OUTPUT_TOKENS["gpt-image-2" if model.startswith("gpt-image-2") else "gpt-image-1"]
        out = table[quality] * n
        usage = {
            "total_tokens": text + out,
            "input_tokens": text,
            "output_tokens": out,
            "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
            "output_tokens_details": {"image_tokens": out, "text_tokens": 0},
        }
        tail = {
            "background": "opaque",
            "output_format": "png",
            "size": f"{SIDE}x{SIDE}",
            "quality": quality,
            "usage": usage,
        }
        parts.append(b"], " + json.dumps(tail).encode()[1:])
        return parts

    def stats_json(self) -> dict[str, object]:
        d = dict(vars(self.stats))
        d["uptime"] = time.time() - d.pop("started")
        d["png_bytes"] = self.png_sizes
        return d


def error(message: str, type_: str, code: str | None = None) -> list[bytes]:
    return [
        json.dumps(
            {"error": {"message": message, "type": type_, "param": None, "code": code}}
        ).encode()
    ]


def parse_latency(spec: str):  # type: ignore[no-untyped-def]
    if spec.startswith("uniform:"):
        lo, hi = (float(x) for x in spec.removeprefix("uniform:").split(","))
        return lambda rng: rng.uniform(lo, hi)
    fixed = float(spec)
    return lambda rng: fixed


async def serve(args: argparse.Namespace) -> None:
    ref = RefServer(args)
    server = await asyncio.start_server(
        ref.handle, args.host, args.port, limit=1 << 20, backlog=1024
    )
    port = server.sockets[0].getsockname()[1]
    sizes = ", ".join(f"{s / 1e6:.2f}" for s in ref.png_sizes)
    print(f"refserver: {len(ref.images)} PNGs of {sizes} MB", file=sys.stderr, flush=True)
    print(f"listening on http://{args.host}:{port}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100, help="0 = any free port")
    ap.add_argument("--latency", default="uniform:1,3", help="seconds: uniform:LO,HI or a number")
    ap.add_argument("--ipm", type=int, default=0, help="images per minute (0 = unlimited)")
    ap.add_argument(
        "--burst-seconds",
        type=float,
        default=60.0,
        help="bucket size in seconds of --ipm (default 60: a full minute's images)",
    )
    ap.add_argument("--retry-after", action="store_true", help="send retry-after(-ms) on 429s")
    ap.add_argument(
        "--no-stated-limit",
        action="store_true",
        help="leave 'Limit N' out of 429 messages (the client must find the limit by itself)",
    )
    ap.add_argument("--images", type=int, default=6, help="distinct PNGs served in turn")
    ap.add_argument("--png-mb", type=float, default=3.0, help="size of each PNG in MB")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
