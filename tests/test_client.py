"""The API client against real servers on loopback: wire format, URL downloads, secrets."""

from __future__ import annotations

import asyncio
import http.server
import io
import threading
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest
from PIL import Image

from imagebatch.configs.registry import Registry
from imagebatch.configs.settings import ApiSettings, JobDefaults
from imagebatch.tasks.api_client import ImagesClient
from imagebatch.tasks.errors import (
    ApiError,
    FatalError,
    RejectedError,
    RequestError,
)
from imagebatch.tasks.plan import plan_jobs, units_for
from imagebatch.tasks.read_jobs import read_jobs
from imagebatch.tasks.validate import Validator

KEY = "sk-client-test-KEY-0123456789abcdef"


def units(rows: list[dict], base_dir: Path | None = None):
    checked = Validator(
        Registry.load(), JobDefaults(), targets_openai=False, base_dir=base_dir
    ).check(read_jobs(pd.DataFrame(rows)))
    assert not checked.invalid, checked.problems
    return [u for p in plan_jobs(checked.valid) for u in units_for(p, range(p.job.n))]


def send(base_url: str, unit, **api):
    async def go():
        async with ImagesClient(ApiSettings(base_url=base_url, api_key=KEY, **api)) as client:
            return await client.send(unit)

    return asyncio.run(go())


def test_generation_b64_and_url(sim):
    (gpt,) = units([{"prompt": "a cat", "model": "gpt-image-2", "n": 2, "size": "1536x1024"}])
    result = send(sim.base_url, gpt)
    assert len(result.images) == 2 and result.request_id.startswith("req_")
    assert result.usage and result.usage["output_tokens"] > 0
    assert Image.open(io.BytesIO(result.images[0].data)).size == (1536, 1024)
    (dalle,) = units([{"prompt": "a dog", "model": "dall-e-3", "response_format": "url"}])
    result = send(sim.base_url, dalle)
    assert result.images[0].revised_prompt
    assert Image.open(io.BytesIO(result.images[0].data)).size == (1024, 1024)


def test_edit_with_two_images_and_a_mask_is_multipart(sim, tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "b.png")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(tmp_path / "m.png")
    (unit,) = units(
        [
            {
                "prompt": "merge",
                "model": "gpt-image-1.5",
                "operation": "edit",
                "image": "a.png|b.png",
                "mask": "m.png",
            }
        ],
        tmp_path,
    )
    client = ImagesClient(ApiSettings(base_url=sim.base_url, api_key=KEY))
    request = client.build_request(unit)
    body = request.read()
    assert b'name="image[]"' in body and b'name="mask"' in body and b'name="n"\r\n\r\n1' in body
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert len(send(sim.base_url, unit).images) == 1


def test_errors_are_classified(sim):
    (unit,) = units([{"prompt": "something forbidden", "model": "gpt-image-2"}])
    with pytest.raises(RejectedError) as info:
        send(sim.base_url, unit)
    assert info.value.code == "moderation_blocked" and info.value.request_id
    sim.configure(api_key="sk-other")
    try:
        (unit,) = units([{"prompt": "ok", "model": "gpt-image-2"}])
        with pytest.raises(FatalError) as info:
            send(sim.base_url, unit)
        assert info.value.status == 401
        assert KEY not in str(info.value)
    finally:
        sim.configure(api_key=None)


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[dict]] = []
    body = b""
    declare = True  # False: no Content-Length, the body ends when the connection closes

    def do_GET(self):
        _Recorder.seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.declare:
            self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "green").save(buf, "PNG")
    _Recorder.body = buf.getvalue()
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/img.png"
    server.shutdown()


@pytest.mark.parametrize("declare", [True, False], ids=["declared", "undeclared"])
def test_url_download_sends_no_credentials_and_has_a_cap(recorder, declare, monkeypatch):
    monkeypatch.setattr(_Recorder, "declare", declare)

    async def go(cap: int):
        async with ImagesClient(
            ApiSettings(base_url="http://127.0.0.1:9/v1", api_key=KEY, max_download_bytes=cap)
        ) as client:
            return await client.download(recorder)

    data = asyncio.run(go(10_000))
    assert data == _Recorder.body
    assert not any("authorization" in {k.lower() for k in h} for h in _Recorder.seen)
    assert all(KEY not in str(h) for h in _Recorder.seen)
    with pytest.raises(ApiError, match="cap") as info:
        asyncio.run(go(10))
    assert info.value.code == "download_too_large"
    assert ("declares" if declare else "bytes read") in info.value.message


def test_expired_url_fails_the_image_without_generating_it_again(sim):
    """A 404 URL never comes back: the image fails (RequestError, not retried), rather than
    being paid for again; the message names the image URL."""

    async def go():
        async with ImagesClient(ApiSettings(base_url=sim.base_url, api_key=KEY)) as client:
            return await client.download(sim.url + "/v1/_sim/files/nope", tries=2)

    with pytest.raises(RequestError, match="HTTP 404") as info:
        asyncio.run(go())
    assert info.value.code == "download_failed" and "/v1/_sim/files/nope" in info.value.message
