"""The simulator behaves as the servers people really use: today's models, file MIME types,
distinct images, 429s without retry-after, Azure's shapes, proxies' error bodies."""

from __future__ import annotations

import base64
import io
import time

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from imagebatch.simulator import SimConfig, SimulatorServer

KEY = "sk-fidelity-0123456789"


@pytest.fixture(scope="module")
def sim():
    with SimulatorServer(SimConfig(latency=0.0)) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(sim):
    sim.reset()
    sim.configure(**SimConfig(latency=0.0).to_dict(redact=False))


@pytest.fixture(scope="module")
def client(sim):
    with OpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0) as c:
        yield c


def png(size=(64, 64), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 20, 30, 255)[: len(mode)]).save(buf, "PNG")
    return buf.getvalue()


def test_current_models_snapshots_and_unknown_gpt_image_names(client):
    for model in (
        "gpt-image-2.5-flare",
        "gpt-image-2.5-sunburst-2026-09-08",
        "gpt-image-2-2026-04-21",
        "gpt-image-3",  # not in the registry: the newest family's rules
    ):
        r = client.images.generate(model=model, prompt="x", quality="high", size="1280x720")
        assert r.size == "1280x720", model
    r = client.images.generate(
        model="gpt-image-2.6-ember", prompt="x", quality="xhigh", background="transparent"
    )
    assert r.quality == "xhigh" and r.background == "transparent"
    with pytest.raises(openai.BadRequestError):  # gpt-image-2's own rules have no xhigh
        client.images.generate(model="gpt-image-2-2026-04-21", prompt="x", quality="xhigh")
    with pytest.raises(openai.NotFoundError) as err:
        client.images.generate(model="flux-pro", prompt="x")
    assert err.value.code == "model_not_found"


def test_file_parts_need_an_image_mime_type(client):
    for name, mime in (("a.png", "application/octet-stream"), ("a.gif", "image/gif")):
        with pytest.raises(openai.BadRequestError) as err:
            client.images.edit(model="gpt-image-2", image=(name, png(), mime), prompt="x")
        assert err.value.code == "unsupported_file_mimetype" and err.value.param == "image"
        assert mime in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(
            model="gpt-image-2",
            image=("a.png", png(), "image/png"),
            mask=("m.png", png(mode="RGBA"), "text/plain"),
            prompt="x",
        )
    assert err.value.code == "unsupported_file_mimetype" and err.value.param == "mask"
    for mime in ("image/png", "image/jpeg", "image/webp"):
        fmt = mime.split("/")[1].upper()
        buf = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buf, fmt)
        assert client.images.edit(
            model="gpt-image-2", image=("a", buf.getvalue(), mime), prompt="x"
        ).data


def test_images_of_one_job_are_distinct_within_and_across_calls(client):
    three = client.images.generate(model="gpt-image-2", prompt="a teapot", n=3).data
    single = [
        client.images.generate(model="dall-e-3", prompt="a teapot", response_format="b64_json")
        .data[0]
        .b64_json
        for _ in range(3)
    ]
    assert len({d.b64_json for d in three}) == 3
    assert len(set(single)) == 3
    for blob in single:
        Image.open(io.BytesIO(base64.b64decode(blob))).verify()


def test_some_429s_come_without_retry_after_and_the_message_has_the_hint(sim):
    sim.configure(ipm=1, omit_retry_after_rate=0.5)
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": "gpt-image-2", "prompt": "x"}
    assert httpx.post(sim.base_url + "/images/generations", json=body, headers=headers).is_success
    answers = [
        httpx.post(sim.base_url + "/images/generations", json=body, headers=headers)
        for _ in range(4)
    ]
    assert [r.status_code for r in answers] == [429] * 4
    with_hint = ["retry-after" in r.headers for r in answers]
    assert with_hint == [True, False, True, False]  # every second one, deterministically
    for r in answers:
        assert "try again in" in r.json()["error"]["message"]


def test_reset_headers_as_unix_times(sim):
    sim.configure(rpm=5, reset_format="unix")
    before = time.time()
    r = httpx.post(
        sim.base_url + "/images/generations",
        json={"model": "gpt-image-2", "prompt": "x"},
        headers={"authorization": f"Bearer {KEY}"},
    )
    after = time.time()
    reset = int(r.headers["x-ratelimit-reset-requests"])
    assert int(before) <= reset <= after + 61  # an absolute time within the next minute


def test_proxy_and_fastapi_error_shapes(sim):
    headers = {"authorization": f"Bearer {KEY}"}
    url = sim.base_url + "/images/generations"
    sim.configure(error_style="litellm")
    r = httpx.post(url, json={"model": "gpt-image-2", "prompt": "forbidden"}, headers=headers)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "400"
    assert err["message"].startswith("litellm.BadRequestError: OpenAIException - ")
    assert "safety system" in err["message"]
    sim.configure(error_style="fastapi")
    prompt = "a long prompt " * 50
    r = httpx.post(url, json={"model": "gpt-image-2", "prompt": prompt, "n": 99}, headers=headers)
    detail = r.json()["detail"]
    assert r.status_code == 422 and detail[0]["loc"] == ["body", "n"]
    assert detail[0]["input"]["prompt"] == prompt  # the request echoed back, as FastAPI does


def test_billing_hard_limit(sim):
    sim.configure(quota_images=1, quota_error="billing_hard_limit_reached")
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": "gpt-image-2", "prompt": "x"}
    url = sim.base_url + "/images/generations"
    assert httpx.post(url, json=body, headers=headers).is_success
    r = httpx.post(url, json=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "billing_hard_limit_reached"


def test_model_list_leaves_out_what_is_refused(sim):
    headers = {"authorization": f"Bearer {KEY}"}
    ids = {m["id"] for m in httpx.get(sim.base_url + "/models", headers=headers).json()["data"]}
    assert {"gpt-image-2.5-flare", "gpt-image-2.5-sunburst", "dall-e-2"} <= ids
    sim.configure(refuse_retired=True)
    ids = {m["id"] for m in httpx.get(sim.base_url + "/models", headers=headers).json()["data"]}
    assert "dall-e-2" not in ids and "gpt-image-2" in ids
    r = httpx.get(sim.url + "/openai/models?api-version=x", headers={"api-key": KEY})
    assert r.status_code == 200 and r.json()["data"]


def test_moderation_is_refused_on_the_edit_form(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(
            model="gpt-image-2",
            image=("a.png", png(), "image/png"),
            prompt="x",
            extra_body={"moderation": "low"},
        )
    assert err.value.code == "unknown_parameter" and "moderation" in err.value.message
    assert client.images.generate(model="gpt-image-2", prompt="x", moderation="low").data
