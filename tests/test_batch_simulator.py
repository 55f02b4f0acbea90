"""The simulator's Files and Batch API, driven by the official SDK's `files` and `batches` clients."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from openai import OpenAI
from PIL import Image

from imagebatch.simulator import SimConfig, SimulatorServer


@pytest.fixture()
def sim():
    with SimulatorServer(SimConfig()) as server:
        yield server


@pytest.fixture()
def client(sim):
    return OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)


def _line(custom_id: str, prompt: str, n: int = 1, url: str = "/v1/images/generations") -> dict:
    body = {"model": "gpt-image-1", "prompt": prompt, "n": n, "size": "1024x1024", "quality": "low"}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _upload(client: OpenAI, lines: list[dict]) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    f = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(data) and f.status == "processed"
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).read() == data
    return f.id


def _until(client: OpenAI, batch_id: str, statuses: tuple[str, ...]):
    deadline = time.monotonic() + 60  # a safety net against a hang, not a timing assertion
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} never reached {statuses}")


def _jsonl(client: OpenAI, file_id: str | None) -> list[dict]:
    assert file_id is not None
    return [json.loads(x) for x in client.files.content(file_id).read().splitlines()]


def test_batch_runs_lines_like_live_calls_and_reports_each(client, sim):
    file_id = _upload(
        client,
        [
            _line("ok", "a red mug", n=2),
            _line("refused", "something forbidden"),
            _line("boom", "batchfail please"),
        ],
    )
    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/images/generations",
        completion_window="24h",
        metadata={"who": "test"},
    )
    assert batch.status == "validating" and batch.metadata == {"who": "test"}
    done = _until(client, batch.id, ("completed",))
    assert done.request_counts.total == 3
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
    assert done.completed_at and done.in_progress_at and done.finalizing_at

    [out] = _jsonl(client, done.output_file_id)
    assert set(out) == {"id", "custom_id", "response", "error"} and out["error"] is None
    assert out["custom_id"] == "ok" and out["response"]["status_code"] == 200
    assert out["response"]["request_id"].startswith("req_")
    images = out["response"]["body"]["data"]
    assert len(images) == 2
    with Image.open(io.BytesIO(base64.b64decode(images[0]["b64_json"]))) as img:
        assert img.size == (1024, 1024)
    assert out["response"]["body"]["usage"]["output_tokens"] > 0

    errors = {e["custom_id"]: e for e in _jsonl(client, done.error_file_id)}
    assert errors["refused"]["response"]["status_code"] == 400
    assert errors["refused"]["response"]["body"]["error"]["code"] == "moderation_blocked"
    assert errors["boom"]["response"]["status_code"] == 500
    stats = sim.stats()
    assert stats["batch"]["batches_created"] == 1
    assert stats["images_billed"] == 2  # the refusal and the 500 cost nothing


def test_cancel_leaves_unrun_lines_in_the_error_file(client, sim):
    sim.configure(batch_hold=True)
    file_id = _upload(client, [_line(f"l{i}", "a cat") for i in range(3)])
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/images/generations", completion_window="24h"
    )
    _until(client, batch.id, ("in_progress",))
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = _until(client, batch.id, ("cancelled",))
    assert done.output_file_id is None and done.cancelled_at
    lines = _jsonl(client, done.error_file_id)
    assert {x["error"]["code"] for x in lines} == {"batch_cancelled"}
    assert all(x["response"] is None for x in lines) and len(lines) == 3
    assert sim.stats()["images_billed"] == 0


def test_expiry_ends_the_batch_expired(client, sim):
    sim.configure(batch_hold=True, batch_expire_seconds=0.3)
    file_id = _upload(client, [_line("a", "a cat")])
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/images/generations", completion_window="24h"
    )
    done = _until(client, batch.id, ("expired",))
    [line] = _jsonl(client, done.error_file_id)
    assert line["error"]["code"] == "batch_expired" and done.expired_at


def test_invalid_input_fails_validation_with_line_numbers(client):
    file_id = _upload(
        client, [_line("a", "a cat"), _line("a", "dup"), _line("b", "x", url="/v1/images/edits")]
    )
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/images/generations", completion_window="24h"
    )
    done = _until(client, batch.id, ("failed",))
    codes = {(e.code, e.line) for e in done.errors.data}
    assert ("duplicate_custom_id", 2) in codes and ("mismatched_url", 3) in codes


def test_line_limit_and_listing_by_input_file(client, sim):
    sim.configure(batch_max_lines=2)
    file_id = _upload(client, [_line(f"l{i}", "a cat") for i in range(3)])
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/images/generations", completion_window="24h"
    )
    done = _until(client, batch.id, ("failed",))
    assert done.errors.data[0].code == "too_many_requests"
    listed = [b.id for b in client.batches.list(limit=1)]
    assert batch.id in listed


def test_edit_lines_take_the_json_form(client):
    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), (200, 10, 10, 255)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    line = {
        "custom_id": "e",
        "method": "POST",
        "url": "/v1/images/edits",
        "body": {"model": "gpt-image-1", "prompt": "make it blue", "images": [{"image_url": url}]},
    }
    file_id = _upload(client, [line])
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/images/edits", completion_window="24h"
    )
    done = _until(client, batch.id, ("completed",))
    [out] = _jsonl(client, done.output_file_id)
    assert out["response"]["status_code"] == 200
