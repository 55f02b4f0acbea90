"""The server's answer is bounded and checked: a hostile compatible server on loopback sends
huge bodies, drips its answer, and returns images nobody asked for (issue 14)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from imagebatch.cli import main
from imagebatch.configs.registry import Registry
from imagebatch.configs.settings import ApiSettings, JobDefaults
from imagebatch.tasks.api_client import ImagesClient
from imagebatch.tasks.plan import plan_jobs, units_for
from imagebatch.tasks.read_jobs import read_jobs
from imagebatch.tasks.validate import Validator

KEY = "sk-bounds-test-0123456789"
HUGE = 120_000_000  # bytes of a hostile answer; the test's cap is 4 MB per image
CONFIG = """
[api]
max_response_bytes_per_image = 4_000_000
request_deadline = {deadline}
[retry]
max_attempts = 2
backoff_initial = 0.01
"""


def _image(size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, fmt)
    return buf.getvalue()


def _answer(image: bytes) -> bytes:
    return json.dumps(
        {"created": 1, "data": [{"b64_json": base64.b64encode(image).decode()}]}
    ).encode()


class Bounds(BaseHTTPRequestHandler):
    counts: ClassVar[Counter] = Counter()  # requests per prompt
    sent: ClassVar[Counter] = Counter()  # body bytes the server got out per prompt

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        prompt = body["prompt"]
        self.counts[prompt] += 1
        size = body.get("size") or "auto"
        width, height = (1536, 1024) if size == "auto" else map(int, size.split("x"))
        fmt = {"jpeg": "JPEG", "webp": "WEBP"}.get(body.get("output_format"), "PNG")
        if prompt == "bmp":
            fmt = "BMP"
        elif prompt == "jpeg instead":
            fmt = "JPEG"
        elif prompt == "smaller":
            width, height = 512, 512
        answer = _answer(_image((width, height), fmt))
        try:
            if prompt == "huge declared":
                self._stream(prompt, answer, declared=True)
            elif prompt == "huge streamed":
                self._stream(prompt, answer, declared=False)
            elif prompt == "drip":
                self._drip(prompt, answer)
            else:
                self._head(len(answer))
                self.wfile.write(answer)
        except OSError:  # the client hung up: that is what the tests want to see
            pass

    def _head(self, length: int | None) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        if length is not None:
            self.send_header("content-length", str(length))
        self.end_headers()

    def _stream(self, prompt: str, answer: bytes, declared: bool) -> None:
        """A valid answer padded with whitespace to HUGE bytes, sent as fast as it is read;
        without a content-length the body ends when the connection closes."""
        padding = HUGE - len(answer)
        self._head(HUGE if declared else None)
        self.wfile.write(answer[:-1])
        self.sent[prompt] += len(answer) - 1
        chunk = b" " * (1 << 20)
        while padding > 1 << 20:
            self.wfile.write(chunk)
            self.sent[prompt] += len(chunk)
            padding -= len(chunk)
        self.wfile.write(b" " * padding + b"}")
        self.sent[prompt] += padding + 1

    def _drip(self, prompt: str, answer: bytes) -> None:
        """Forty bytes of whitespace, one every quarter second (never silent as long as the
        read timeout), then the valid answer: ten seconds for the whole body."""
        self._head(40 + len(answer))
        for _ in range(40):
            self.wfile.write(b" ")
            self.wfile.flush()
            self.sent[prompt] += 1
            time.sleep(0.25)
        self.wfile.write(answer)


@pytest.fixture
def server():
    Bounds.counts, Bounds.sent = Counter(), Counter()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Bounds)
    httpd.daemon_threads = True
    httpd.block_on_close = False  # a dripping handler ends on its own once the client hangs up
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def run(server, tmp_path: Path, rows: list[dict], deadline: float = 600.0):
    jobs = tmp_path / "jobs.csv"
    pd.DataFrame(rows).to_csv(jobs, index=False)
    config = tmp_path / "bounds.toml"
    config.write_text(CONFIG.format(deadline=deadline))
    out = tmp_path / "out"
    env = {
        "OPENAI_BASE_URL": f"http://127.0.0.1:{server.server_address[1]}/v1",
        "OPENAI_API_KEY": KEY,
    }
    args = ["run", str(jobs), "--out", str(out), "--config", str(config), "-q"]
    result = CliRunner().invoke(main, args, env=env)
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False).set_index("job_id")
    return result, manifest, json.loads((out / "run.json").read_text())


def test_huge_answers_are_refused_without_reading_them(prefect_api, server, tmp_path):
    rows = [
        {"id": "declared", "prompt": "huge declared", "model": "gpt-image-2"},
        {"id": "streamed", "prompt": "huge streamed", "model": "gpt-image-2"},
        {"id": "fine", "prompt": "a fine picture", "model": "gpt-image-2"},
    ]
    result, m, run_json = run(server, tmp_path, rows)
    assert result.exit_code == 1, result.output
    assert m.loc["fine", "status"] == "succeeded"
    for job in ("declared", "streamed"):
        assert m.loc[job, "status"] == "failed"
        assert m.loc[job, "error_code"] == "response_too_large"
    assert f"declares {HUGE:,} bytes" in m.loc["declared", "error_message"]
    # Refused, not retried: the same request would bring (and bill) the same answer.
    assert Bounds.counts["huge declared"] == 1 and Bounds.counts["huge streamed"] == 1
    # The reads stopped near the 5 MB cap: the server got out a small part of its 120 MB
    # (what it managed to send is at most the cap plus the loopback socket buffers).
    assert Bounds.sent["huge declared"] < HUGE // 4
    assert Bounds.sent["huge streamed"] < HUGE // 4
    # Answered with a 2xx, so possibly billed: counted, but not as paid twice.
    assert run_json["cost"]["possibly_paid_usd"] > 0
    assert int(m.ambiguous_retries.sum()) == 0


def test_a_dripping_answer_ends_at_the_request_deadline(prefect_api, server, tmp_path):
    rows = [{"id": "drip", "prompt": "drip", "model": "gpt-image-2"}]
    result, m, _ = run(server, tmp_path, rows, deadline=2.0)
    assert result.exit_code == 1, result.output
    assert m.loc["drip", "status"] == "failed"
    assert m.loc["drip", "error_code"] == "request_deadline"
    # A lost answer may have been billed: the retry (max_attempts = 2) is counted.
    assert Bounds.counts["drip"] == 2
    assert int(m.loc["drip", "ambiguous_retries"]) == 1
    assert "may have been paid twice" in result.output


def test_images_not_asked_for_fail_with_a_clear_code(prefect_api, server, tmp_path):
    rows = [
        {"id": "bmp", "prompt": "bmp", "model": "gpt-image-2", "size": "1024x1024"},
        {"id": "jpeg", "prompt": "jpeg instead", "model": "gpt-image-2", "output_format": "png"},
        {"id": "small", "prompt": "smaller", "model": "gpt-image-2", "size": "1024x1024"},
        {"id": "auto", "prompt": "any size", "model": "gpt-image-2", "size": "auto"},
        {"id": "free", "prompt": "free size", "model": "gpt-image-2", "size": "1280x720"},
        {"id": "webp", "prompt": "as webp", "model": "gpt-image-2", "output_format": "webp"},
        {"id": "dalle", "prompt": "classic", "model": "dall-e-2", "size": "512x512"},
    ]
    result, m, _ = run(server, tmp_path, rows)
    assert result.exit_code == 1, result.output
    assert m.loc["bmp", "error_code"] == "unexpected_image_format"
    assert "BMP" in m.loc["bmp", "error_message"]
    assert m.loc["jpeg", "error_code"] == "unexpected_image_format"
    assert m.loc["small", "error_code"] == "unexpected_image_size"
    assert "512x512" in m.loc["small", "error_message"]
    for job in ("bmp", "jpeg", "small"):
        assert m.loc[job, "status"] == "failed" and m.loc[job, "file"] == ""
        # Answered and billed once; asking again would bring the same answer.
        assert Bounds.counts[m.loc[job, "prompt"]] == 1
        assert int(m.loc[job, "ambiguous_retries"]) == 0
    for job in ("auto", "free", "webp", "dalle"):
        assert m.loc[job, "status"] == "succeeded", m.loc[job, "error_message"]
    assert (m.loc["auto", "width"], m.loc["auto", "height"]) == ("1536", "1024")
    assert (m.loc["free", "width"], m.loc["free", "height"]) == ("1280", "720")
    assert m.loc["webp", "file"].endswith(".webp")
    stored = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert stored == ["auto_0.png", "dalle_0.png", "free_0.png", "webp_0.webp"]


def _unit():

    rows = pd.DataFrame([{"prompt": "x", "model": "gpt-image-2"}])
    checked = Validator(Registry.load(), JobDefaults(), targets_openai=False).check(read_jobs(rows))
    (planned,) = plan_jobs(checked.valid)
    return next(iter(units_for(planned, range(1))))


def _send_to(handler) -> Exception | None:
    async def go() -> None:
        api = ApiSettings(
            base_url="https://api.example/v1", api_key=KEY, max_response_bytes_per_image=4_000_000
        )
        async with ImagesClient(api, transport=httpx.MockTransport(handler)) as client:
            await client.send(_unit())

    try:
        asyncio.run(go())
    except Exception as exc:
        return exc
    return None


def test_a_compressed_answer_is_capped_by_what_it_inflates_to():
    bomb = gzip.compress(b'{"data": [' + b" " * 60_000_000 + b"]}")
    assert len(bomb) < 1_000_000

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=bomb, headers={"content-encoding": "gzip"})

    error = _send_to(handler)
    assert getattr(error, "code", None) == "response_too_large", error


def test_an_error_body_is_read_only_as_far_as_it_says_something():
    body = json.dumps({"error": {"message": "slow down", "code": "rate_limit_exceeded"}})
    huge = body.encode() + b" " * 50_000_000

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, content=huge)

    error = _send_to(handler)
    # Cut at 1 MB, the start still classifies: a rate limit, not a malformed answer.
    assert type(error).__name__ == "RateLimited", error


def test_the_deadline_follows_the_timeouts_unless_set():
    assert ApiSettings().deadline == 10 + 120 + 360 + 120
    assert ApiSettings(read_timeout=900).deadline > 900  # a slower server is never cut short
    assert ApiSettings(request_deadline=5).deadline == 5


@pytest.mark.parametrize(
    "tamper",
    [
        lambda b64: b64[:100] + " " + b64[100:],  # whitespace inside
        lambda b64: b64[:100] + "\n" + b64[100:],  # a line break, as MIME base64 has
        lambda b64: b64 + "=",  # excess padding
        lambda b64: b64 + "QUJD",  # data after the padding
        lambda b64: b64[:100] + "*" + b64[101:],  # outside the alphabet
        lambda b64: b64.rstrip("=")[:-1],  # cut short
    ],
)
def test_b64_json_is_decoded_strictly(tamper):
    """An image's base64 is taken only when it is exactly base64: anything a lenient
    decoder would skip over makes the answer malformed (retried), never other bytes."""
    image = _image((64, 64), "PNG")
    image += b"\0" * ((1 - len(image)) % 3)  # so its base64 ends in "=="

    def handler(request: httpx.Request) -> httpx.Response:
        b64 = tamper(base64.b64encode(image).decode())
        return httpx.Response(200, json={"created": 1, "data": [{"b64_json": b64}]})

    error = _send_to(handler)
    assert getattr(error, "code", None) == "malformed_response", error
    assert "not valid base64" in str(error)


def test_b64_json_is_decoded_to_the_image_bytes():
    image = _image((64, 64), "PNG")
    got: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        b64 = base64.b64encode(image).decode()
        return httpx.Response(200, json={"created": 1, "data": [{"b64_json": b64}]})

    async def go() -> None:
        api = ApiSettings(base_url="https://api.example/v1", api_key=KEY)
        async with ImagesClient(api, transport=httpx.MockTransport(handler)) as client:
            got.extend(i.data for i in (await client.send(_unit())).images)

    asyncio.run(go())
    assert got == [image]


def test_answers_arriving_together_are_read_a_few_at_a_time():
    """Each body being read holds a whole buffer, so answers that arrive together are read
    at most READERS at a time; the others wait unread (in the socket) and all complete."""
    from imagebatch.tasks.api_client import READERS

    answer = _answer(_image((64, 64), "PNG"))
    reading = peak = 0

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self):
            nonlocal reading, peak
            reading += 1
            peak = max(peak, reading)
            for start in range(0, len(answer), 100):
                await asyncio.sleep(0)  # other bodies get their turn, as sockets would
                yield answer[start : start + 100]
            reading -= 1

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"content-length": str(len(answer)), "content-type": "application/json"}
        return httpx.Response(200, stream=Body(), headers=headers)

    async def go() -> list[int]:
        api = ApiSettings(base_url="https://api.example/v1", api_key=KEY)
        async with ImagesClient(api, transport=httpx.MockTransport(handler)) as client:
            results = await asyncio.gather(*(client.send(_unit()) for _ in range(5 * READERS)))
        return [len(r.images) for r in results]

    assert asyncio.run(go()) == [1] * (5 * READERS)
    assert peak == READERS
