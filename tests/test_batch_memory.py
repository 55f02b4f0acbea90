"""A batch output file is streamed to disk and read a line at a time: memory stays flat.

The output file is made of real image lines (about 1 MB of base64 each), served by the
simulator's Files API, downloaded by the batch client and collected into images and
journal lines. Python's peak traced allocation during download and collection is bounded by
a few lines' worth, whatever the number of lines; holding the file (or a sixth of it) would
exceed the bound.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import tracemalloc
from pathlib import Path

from helpers import no_download, open_store
from openai import OpenAI
from PIL import Image

from imagebatch.configs.settings import ApiSettings, RetrySettings
from imagebatch.simulator import SimConfig, SimulatorServer
from imagebatch.tasks.batch_api import BatchApi
from imagebatch.tasks.batch_collect import Collector
from imagebatch.tasks.batch_ledger import Part
from imagebatch.tasks.journal import Journal
from imagebatch.tasks.store import Expected

LINES = 120


def _noise_png(side: int = 600) -> bytes:
    rng = random.Random(7)
    img = Image.frombytes(
        "RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3))
    )
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _output_file(path: Path) -> Part:
    b64 = base64.b64encode(_noise_png()).decode("ascii")
    units = {}
    with path.open("w") as f:
        for i in range(LINES):
            cid = f"ib-{i:04d}"
            units[cid] = [[f"key{i:04d}", f"job{i}", f"job{i}", 0]]
            body = {
                "created": 1,
                "data": [{"b64_json": b64}],
                "usage": {"input_tokens": 10, "output_tokens": 100},
            }
            response = {"status_code": 200, "request_id": f"req_{i}", "body": body}
            f.write(
                json.dumps(
                    {"id": f"batch_req_{i}", "custom_id": cid, "response": response, "error": None}
                )
                + "\n"
            )
    return Part("p", "/v1/images/generations", "batch/p.jsonl", LINES, 0, "", units)


def test_large_output_file_is_streamed_and_collected_in_flat_memory(tmp_path):
    source = tmp_path / "output.jsonl"
    part = _output_file(source)
    size = source.stat().st_size
    assert size > 100_000_000
    out = tmp_path / "out"
    store, journal = open_store(out)

    with SimulatorServer(SimConfig()) as sim:
        client = OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)
        with source.open("rb") as f:
            file_id = client.files.create(file=("output.jsonl", f), purpose="batch").id
        source.unlink()

        async def download_and_collect():
            api = BatchApi(ApiSettings(base_url=sim.base_url, api_key="sk-test"), RetrySettings())
            async with api:
                dest = out / "p.output.jsonl"
                await api.download(file_id, dest)
                records: dict = {}
                collector = Collector(store, journal, "run", no_download, records)
                got = await collector.collect(
                    part, {"id": "batch_x", "status": "completed"}, [dest], True
                )
                return got, dest

        tracemalloc.start()
        try:
            got, dest = asyncio.run(download_and_collect())
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    journal.close()

    assert dest.stat().st_size == size  # the whole file arrived
    assert len(got.records) == LINES and {r.status for r in got.records} == {"succeeded"}
    assert len(list(store.images_dir.iterdir())) == LINES
    assert len(Journal(out).load()) == LINES
    # A handful of lines in flight at once (each as read, as parsed text and decoded: about
    # three copies), never the file: the bound is 20 lines' worth, a sixth of the file.
    line_size = size / LINES
    assert peak < 20 * line_size, (peak, line_size, size)


def _line(cid: str, image: bytes) -> str:
    body = {"created": 1, "data": [{"b64_json": base64.b64encode(image).decode("ascii")}]}
    response = {"status_code": 200, "request_id": f"req_{cid}", "body": body}
    return json.dumps({"custom_id": cid, "response": response, "error": None}) + "\n"


def _encoded(fmt: str, side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


def test_batch_images_not_in_the_asked_format_or_size_fail_at_once(tmp_path):
    """As in a live run: a whole image that is not what the line asked for is `failed` with
    its code (never stored, never sent again); the right one is stored."""
    images = {"ok": _encoded("PNG", 64), "bmp": _encoded("BMP", 64), "small": _encoded("PNG", 32)}
    source = tmp_path / "output.jsonl"
    source.write_text("".join(_line(cid, data) for cid, data in images.items()))
    units = {cid: [[f"key-{cid}", cid, cid, 0]] for cid in images}
    part = Part("p", "/v1/images/generations", "batch/p.jsonl", 3, 0, "", units)
    out = tmp_path / "out"
    store, journal = open_store(out)
    asked = Expected.of({"size": "64x64", "output_format": "png"})

    async def collect():
        collector = Collector(store, journal, "run", no_download, {}, expect=lambda key: asked)
        return await collector.collect(part, {"id": "b", "status": "completed"}, [source], True)

    got = asyncio.run(collect())
    journal.close()
    by_job = {r.job_id: r for r in got.records}
    assert by_job["ok"].status == "succeeded"
    assert (by_job["bmp"].status, by_job["bmp"].error_code) == ("failed", "unexpected_image_format")
    assert (by_job["small"].status, by_job["small"].error_code) == (
        "failed",
        "unexpected_image_size",
    )
    assert got.retry == {}  # nothing handed back for another round: it would be billed again
    assert [p.name for p in store.images_dir.iterdir()] == [Path(by_job["ok"].file).name]
