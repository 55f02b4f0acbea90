"""The Images API simulator, driven through the official openai SDK and plain httpx."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from imagebatch.simulator import SimConfig, SimulatorServer
from imagebatch.simulator.config import parse_latency
from imagebatch.simulator.failures import rate_limit_failure
from imagebatch.simulator.limits import RateLimits, Rejection, SlidingWindow, go_duration
from imagebatch.simulator.render import RenderCache, render_image

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sim():
    with SimulatorServer(SimConfig(seed=7)) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(request):
    """Each test starts with default knobs, empty stats and empty windows."""
    if "sim" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("sim")
    baseline = SimConfig(seed=7).to_dict(redact=False)
    server.configure(baseline)
    server.reset()
    yield
    server.configure(baseline)


@pytest.fixture(scope="module")
def client(sim):
    with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def http(sim):
    with httpx.Client(
        base_url=sim.url, headers={"Authorization": "Bearer sk-test"}, timeout=10
    ) as c:
        yield c


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def png_bytes(size=(512, 512), mode="RGBA", color=(200, 40, 40, 255), hole=True) -> bytes:
    im = Image.new(mode, size, color if mode != "RGB" else color[:3])
    if hole and mode == "RGBA":
        im.paste((0, 0, 0, 0), (10, 10, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- generations
@pytest.mark.parametrize(
    "model, size, quality, per_image",
    [
        ("gpt-image-2", "1024x1024", "high", 7024),  # OpenAI's calculator figures
        ("gpt-image-2", "1536x1024", "high", 5488),
        ("gpt-image-2", "1024x1024", "low", 196),
        ("gpt-image-2.5-flare", "2048x2048", "medium", 3568),
        ("gpt-image-1", "1024x1024", "high", 4160),  # the published gpt-image-1 table
        ("gpt-image-1", "1536x1024", "low", 400),
        ("gpt-image-1", "1024x1536", "medium", 1584),
    ],
)
def test_usage_output_tokens_follow_the_published_figures(client, model, size, quality, per_image):
    r = client.images.generate(model=model, prompt="a fox", size=size, quality=quality, n=2)
    assert r.usage.output_tokens == 2 * per_image
    assert r.usage.output_tokens_details.image_tokens == 2 * per_image


def test_usage_input_tokens_grow_with_the_prompt_and_input_images(client):
    short = client.images.generate(model="gpt-image-2", prompt="a fox", quality="low")
    long = client.images.generate(model="gpt-image-2", prompt="a fox " * 100, quality="low")
    assert (
        short.usage.input_tokens_details.text_tokens < long.usage.input_tokens_details.text_tokens
    )
    assert short.usage.input_tokens_details.image_tokens == 0
    # named files: bare bytes go out as application/octet-stream, which the API refuses
    one = client.images.edit(
        model="gpt-image-2",
        image=("a.png", png_bytes(), "image/png"),
        prompt="a hat",
        quality="low",
    )
    two = client.images.edit(
        model="gpt-image-2",
        image=[("a.png", png_bytes(), "image/png"), ("b.png", png_bytes(), "image/png")],
        prompt="a hat",
        quality="low",
    )
    assert one.usage.input_tokens_details.image_tokens > 0
    assert (
        two.usage.input_tokens_details.image_tokens
        == 2 * one.usage.input_tokens_details.image_tokens
    )
    assert one.usage.input_tokens == sum(
        (one.usage.input_tokens_details.text_tokens, one.usage.input_tokens_details.image_tokens)
    )


def test_gpt_image_generation_b64_with_usage_and_echo(client):
    raw = client.images.with_raw_response.generate(
        model="gpt-image-2", prompt="a red fox in the snow", size="1536x1024", quality="high", n=2
    )
    assert re.fullmatch(r"req_[0-9a-f]{32}", raw.headers["x-request-id"])
    assert int(raw.headers["openai-processing-ms"]) >= 0
    assert "x-ratelimit-limit-requests" not in raw.headers  # no limits set
    r = raw.parse()
    assert (
        r.size == "1536x1024"
        and r.quality == "high"
        and r.output_format == "png"
        and r.background == "opaque"
    )
    assert r.usage.output_tokens > r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert len(r.data) == 2 and all(d.url is None and d.revised_prompt is None for d in r.data)
    a, b = decode(r.data[0].b64_json), decode(r.data[1].b64_json)
    assert a.format == "PNG" and a.size == (1536, 1024) and b.size == (1536, 1024)
    assert a.tobytes() != b.tobytes()  # images of one request differ


@pytest.mark.parametrize(
    "kwargs, fmt, mode_has_alpha",
    [
        ({"output_format": "jpeg", "output_compression": 40}, "JPEG", False),
        ({"output_format": "webp"}, "WEBP", False),
        ({"output_format": "webp", "background": "transparent"}, "WEBP", True),
        ({"background": "transparent"}, "PNG", True),
    ],
)
def test_output_formats(client, kwargs, fmt, mode_has_alpha):
    r = client.images.generate(model="gpt-image-1.5", prompt="a logo", size="1024x1536", **kwargs)
    im = decode(r.data[0].b64_json)
    assert im.format == fmt and im.size == (1024, 1536)
    assert r.output_format == kwargs.get("output_format", "png")
    has_alpha = im.mode in ("RGBA", "LA") or "transparency" in im.info
    assert has_alpha == mode_has_alpha
    if mode_has_alpha:
        assert r.background == "transparent"
        assert im.convert("RGBA").getextrema()[3][0] == 0  # some pixels fully transparent


def test_auto_size_and_flexible_size(client):
    r = client.images.generate(model="gpt-image-2", prompt="auto", size="auto")
    assert r.size == "1024x1024" and decode(r.data[0].b64_json).size == (1024, 1024)
    r = client.images.generate(model="gpt-image-2", prompt="wide", size="2048x1152")
    assert decode(r.data[0].b64_json).size == (2048, 1152)


def test_images_are_deterministic_and_prompt_dependent(client, sim):
    """Asked again, a prompt gets a new image (as from the real API); a fresh simulator
    replays the same sequence."""
    one = client.images.generate(model="gpt-image-2", prompt="same prompt").data[0].b64_json
    two = client.images.generate(model="gpt-image-2", prompt="same prompt").data[0].b64_json
    other = client.images.generate(model="gpt-image-2", prompt="another prompt").data[0].b64_json
    chinese = client.images.generate(model="gpt-image-2", prompt="月光下的一只猫").data[0].b64_json
    assert len({one, two, other, chinese}) == 4
    sim.reset()
    again = client.images.generate(model="gpt-image-2", prompt="same prompt").data[0].b64_json
    assert again == one


def test_dalle3_url_revised_prompt_and_download(client, sim):
    r = client.images.generate(
        model="dall-e-3",
        prompt="a lighthouse at dawn",
        size="1792x1024",
        quality="hd",
        style="natural",
    )
    item = r.data[0]
    assert item.b64_json is None and item.url.startswith(sim.base_url + "/_sim/files/")
    assert (
        item.revised_prompt
        and "lighthouse at dawn" in item.revised_prompt
        and item.revised_prompt != "a lighthouse at dawn"
    )
    assert r.usage is None and r.output_format is None
    got = httpx.get(item.url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(got.content))
    assert im.format == "PNG" and im.size == (1792, 1024)
    # deterministic rewrite
    again = client.images.generate(
        model="dall-e-3",
        prompt="a lighthouse at dawn",
        size="1792x1024",
        quality="hd",
        style="natural",
    )
    assert again.data[0].revised_prompt == item.revised_prompt


def test_url_expiry(client, sim):
    sim.configure(url_ttl=0.3)
    url = client.images.generate(model="dall-e-2", prompt="short lived", size="256x256").data[0].url
    assert httpx.get(url).status_code == 200
    time.sleep(0.4)
    assert httpx.get(url).status_code == 410
    assert httpx.get(sim.base_url + "/_sim/files/nonexistent").status_code == 404


def test_dalle_b64_json_on_request(client):
    r = client.images.generate(
        model="dall-e-2", prompt="a cube", size="512x512", response_format="b64_json", n=3
    )
    assert len(r.data) == 3 and all(d.url is None for d in r.data)
    assert decode(r.data[2].b64_json).size == (512, 512)


# --------------------------------------------------------------------------- edits and variations
def test_edit_with_mask_and_several_images(client):
    image, mask = png_bytes(), png_bytes()
    r = client.images.edit(
        model="gpt-image-1.5",
        image=("photo.png", image, "image/png"),
        mask=("mask.png", mask, "image/png"),
        prompt="add a hat",
        size="1024x1024",
        input_fidelity="high",
    )
    assert decode(r.data[0].b64_json).size == (1024, 1024)
    assert r.usage.input_tokens_details.image_tokens > 0
    # several images are sent as image[]; size auto follows the first image's aspect
    jpeg = io.BytesIO()
    Image.new("RGB", (900, 600), "navy").save(jpeg, "JPEG")
    r = client.images.edit(
        model="gpt-image-2",
        image=[
            ("a.jpg", jpeg.getvalue(), "image/jpeg"),
            ("b.png", png_bytes((300, 300)), "image/png"),
        ],
        prompt="combine them",
        size="auto",
        output_format="webp",
    )
    assert r.size == "1536x1024"
    assert decode(r.data[0].b64_json).format == "WEBP"


@pytest.mark.parametrize(
    "mask, why",
    [
        (png_bytes(mode="RGB"), "alpha"),
        (png_bytes(size=(256, 256)), "dimensions"),
    ],
)
def test_edit_mask_rules(client, mask, why):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(
            model="gpt-image-1",
            image=("i.png", png_bytes(), "image/png"),
            mask=("m.png", mask, "image/png"),
            prompt="x",
        )
    assert err.value.param == "mask" and why in err.value.message


def test_edit_image_rules(client):
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, "GIF")
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(
            model="gpt-image-1", image=("a.gif", gif.getvalue(), "image/gif"), prompt="x"
        )
    assert err.value.param == "image" and err.value.code == "unsupported_file_mimetype"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(
            model="gpt-image-1", image=("a.png", gif.getvalue(), "image/png"), prompt="x"
        )
    assert err.value.param == "image" and err.value.code == "invalid_image_format"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(
            model="gpt-image-1", image=("a.png", b"not an image", "image/png"), prompt="x"
        )
    assert err.value.code == "invalid_image"
    # dall-e-2: exactly one square PNG
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(
            model="dall-e-2", image=("a.png", png_bytes((512, 256)), "image/png"), prompt="x"
        )
    assert err.value.param == "image" and "square" in err.value.message
    r = client.images.edit(
        model="dall-e-2",
        image=("a.png", png_bytes((256, 256)), "image/png"),
        prompt="x",
        size="256x256",
    )
    assert r.data[0].url and httpx.get(r.data[0].url).status_code == 200
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(model="dall-e-3", image=("a.png", png_bytes(), "image/png"), prompt="x")
    assert err.value.param == "model"


def test_edit_json_form(http):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes((400, 600))).decode()
    r = http.post(
        "/v1/images/edits",
        json={"model": "gpt-image-1.5", "prompt": "recolour", "images": [{"image_url": data_url}]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == "1024x1536" and decode(body["data"][0]["b64_json"]).size == (1024, 1536)
    mask_url = "data:image/png;base64," + base64.b64encode(png_bytes((400, 600))).decode()
    r = http.post(
        "/v1/images/edits",
        json={
            "model": "gpt-image-1",
            "prompt": "hat",
            "size": "1024x1024",
            "images": [{"image_url": data_url}],
            "mask": {"image_url": mask_url},
        },
    )
    assert r.status_code == 200, r.text
    bad_mask = "data:image/png;base64," + base64.b64encode(png_bytes((600, 400))).decode()
    r = http.post(
        "/v1/images/edits",
        json={
            "model": "gpt-image-1",
            "prompt": "hat",
            "images": [{"image_url": data_url}],
            "mask": {"image_url": bad_mask},
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
    r = http.post(
        "/v1/images/edits",
        json={"model": "dall-e-2", "prompt": "x", "images": [{"image_url": data_url}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = http.post(
        "/v1/images/edits",
        json={
            "model": "gpt-image-1.5",
            "prompt": "x",
            "images": [{"image_url": "https://example.com/a.png"}],
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "images[0].image_url"
    r = http.post(
        "/v1/images/edits",
        json={
            "model": "gpt-image-1.5",
            "prompt": "x",
            "images": [{"image_url": data_url}],
            "response_format": "url",
        },
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter"


def test_variations(client):
    r = client.images.create_variation(
        model="dall-e-2", image=("v.png", png_bytes((256, 256)), "image/png"), n=2, size="512x512"
    )
    assert len(r.data) == 2 and all(d.url for d in r.data)
    a, b = (Image.open(io.BytesIO(httpx.get(d.url).content)) for d in r.data)
    assert a.size == b.size == (512, 512) and a.tobytes() != b.tobytes()
    r = client.images.create_variation(
        model="dall-e-2",
        image=("v.png", png_bytes((256, 256)), "image/png"),
        response_format="b64_json",
    )
    assert decode(r.data[0].b64_json).size == (1024, 1024)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.create_variation(
            model="gpt-image-2", image=("v.png", png_bytes((256, 256)), "image/png")
        )
    assert err.value.param == "model"


# --------------------------------------------------------------------------- validation errors
@pytest.mark.parametrize(
    "kwargs, param, code",
    [
        ({"model": "dall-e-3", "n": 2}, "n", "integer_above_max_value"),
        ({"model": "gpt-image-2", "n": 0}, "n", "integer_below_min_value"),
        ({"model": "gpt-image-2", "n": 11}, "n", "integer_above_max_value"),
        ({"model": "gpt-image-1", "size": "1792x1024"}, "size", "invalid_value"),
        ({"model": "gpt-image-2", "size": "1000x1000"}, "size", "invalid_value"),
        ({"model": "gpt-image-2", "size": "3840x800"}, "size", "invalid_value"),
        ({"model": "gpt-image-2", "quality": "hd"}, "quality", "invalid_value"),
        ({"model": "dall-e-3", "quality": "high"}, "quality", "invalid_value"),
        (
            {"model": "gpt-image-2", "response_format": "b64_json"},
            "response_format",
            "unknown_parameter",
        ),
        ({"model": "gpt-image-2", "style": "vivid"}, "style", "unknown_parameter"),
        ({"model": "dall-e-2", "style": "vivid"}, "style", "unknown_parameter"),
        ({"model": "dall-e-3", "output_format": "png"}, "output_format", "unknown_parameter"),
        ({"model": "dall-e-3", "background": "opaque"}, "background", "unknown_parameter"),
        (
            {"model": "gpt-image-1", "output_format": "jpeg", "output_compression": 150},
            "output_compression",
            "invalid_value",
        ),
        ({"model": "gpt-image-1", "output_compression": 50}, "output_compression", "invalid_value"),
        (
            {"model": "gpt-image-1", "output_format": "jpeg", "background": "transparent"},
            "background",
            "invalid_value",
        ),
        ({"model": "gpt-image-2", "background": "transparent"}, "background", "unsupported_value"),
        ({"model": "gpt-image-2", "prompt": ""}, "prompt", "string_below_min_length"),
        ({"model": "dall-e-3", "prompt": "x" * 4001}, "prompt", "string_above_max_length"),
        ({"model": "gpt-image-2", "extra_body": {"colour": "red"}}, "colour", "unknown_parameter"),
    ],
)
def test_bad_requests(client, sim, kwargs, param, code):
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(**kwargs)
    e = err.value
    assert (e.param, e.code, e.type) == (param, code, "invalid_request_error")
    assert e.request_id and e.request_id.startswith("req_")
    assert sim.stats()["images_billed"] == 0


def test_unknown_model_and_wrong_content_type(client, http):
    with pytest.raises(openai.NotFoundError) as err:
        client.images.generate(model="dall-e-9", prompt="x")
    assert err.value.code == "model_not_found"
    r = http.post(
        "/v1/images/generations",
        data={"model": "gpt-image-2", "prompt": "x"},
        files={"f": ("a", b"1")},
    )
    assert r.status_code == 400 and "Unsupported content type" in r.json()["error"]["message"]
    r = http.post(
        "/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "param", "code"}
    r = http.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_refuse_retired(client, sim):
    sim.configure(refuse_retired=True)
    with pytest.raises(openai.NotFoundError) as err:
        client.images.generate(model="dall-e-3", prompt="x")
    assert err.value.code == "model_not_found"


def test_auth(sim, client):
    r = httpx.post(
        sim.base_url + "/images/generations", json={"model": "gpt-image-2", "prompt": "x"}
    )
    assert r.status_code == 401
    assert (
        r.json()["error"]["code"] == "invalid_api_key"
        and r.json()["error"]["type"] == "invalid_request_error"
    )
    sim.configure(api_key="sk-right")
    with pytest.raises(openai.AuthenticationError) as err:
        client.images.generate(model="gpt-image-2", prompt="x")
    assert err.value.code == "invalid_api_key"
    with OpenAI(base_url=sim.base_url, api_key="sk-right", max_retries=0) as good:
        assert good.images.generate(model="gpt-image-2", prompt="x").data
    r = httpx.post(
        sim.base_url + "/images/generations",
        json={"model": "gpt-image-2", "prompt": "x"},
        headers={"api-key": "sk-right"},
    )
    assert r.status_code == 401  # Azure's header on an OpenAI path: no key, as the real API says
    azure = sim.url + "/openai/deployments/gpt-image-2/images/generations?api-version=2025-04-01"
    r = httpx.post(azure, json={"prompt": "x"}, headers={"authorization": "Bearer sk-right"})
    assert r.status_code == 401 and "subscription key" in r.json()["error"]["message"]
    r = httpx.post(azure, json={"prompt": "x"}, headers={"api-key": "sk-right"})
    assert r.status_code == 200
    r = httpx.post(azure.split("?")[0], json={"prompt": "x"}, headers={"api-key": "sk-right"})
    assert r.status_code == 404  # no api-version: Azure finds nothing


def test_azure_deployment_route(sim):
    r = httpx.post(
        sim.url
        + "/openai/deployments/gpt-image-1/images/generations?api-version=2025-04-01-preview",
        json={"prompt": "azure"},
        headers={"api-key": "k"},
    )
    assert r.status_code == 200 and r.json()["output_format"] == "png"


# --------------------------------------------------------------------------- rate limits and quota
def test_ipm_limit_429_and_headers(client, sim):
    sim.configure(ipm=3, window_seconds=0.5)
    raw = client.images.with_raw_response.generate(model="gpt-image-2", prompt="one", n=2)
    h = raw.headers
    assert (h["x-ratelimit-limit-images"], h["x-ratelimit-remaining-images"]) == ("3", "1")
    assert re.fullmatch(r"\d+ms|1s|0s", h["x-ratelimit-reset-images"])
    assert "x-ratelimit-limit-requests" not in h
    with pytest.raises(openai.RateLimitError) as err:
        client.images.generate(model="gpt-image-2", prompt="two", n=2)
    e = err.value
    assert e.code == "rate_limit_exceeded" and e.type == "images"
    assert re.match(
        r"Rate limit reached for gpt-image-2 in organization org-sim on images per 0\.5 s: "
        r"Limit 3, Used 2, Requested 2\. Please try again in \d+ms\.",
        e.body["message"],
    )
    retry_ms = int(e.response.headers["retry-after-ms"])
    assert (
        0 < retry_ms <= 500 and e.response.headers["retry-after"] == "1"
    )  # seconds header: ceil, >= 1
    assert e.response.headers["x-ratelimit-remaining-images"] == "1"
    # one image still fits
    client.images.generate(model="gpt-image-2", prompt="three")
    time.sleep(retry_ms / 1000 + 0.05)
    assert client.images.generate(model="gpt-image-2", prompt="four", n=2).data
    stats = sim.stats()
    assert (
        stats["rate_limited"] == 1 and stats["images_billed"] == 5 and stats["status"]["429"] == 1
    )


def test_rpm_limit_and_rejections_do_not_count(client, sim):
    sim.configure(rpm=1, window_seconds=0.6)
    first = time.monotonic()
    raw = client.images.with_raw_response.generate(model="gpt-image-2", prompt="a")
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    for _ in range(3):  # hammering while limited must not push the window forward
        with pytest.raises(openai.RateLimitError) as err:
            client.images.generate(model="gpt-image-2", prompt="b")
        # a short window is named as such: a client must not read "Limit 1" as per minute
        assert err.value.type == "requests" and "requests per 0.6 s: Limit 1" in err.value.message
    time.sleep(max(0.0, first + 0.65 - time.monotonic()))
    assert client.images.generate(model="gpt-image-2", prompt="c").data


def test_request_larger_than_ipm(client, sim):
    sim.configure(ipm=2)
    with pytest.raises(openai.RateLimitError) as err:
        client.images.generate(model="gpt-image-2", prompt="big", n=3)
    assert err.value.code == "rate_limit_exceeded" and "Request too large" in err.value.message
    assert err.value.response.headers.get("x-should-retry") == "false"


def test_quota(client, sim):
    sim.configure(quota_images=3)
    client.images.generate(model="gpt-image-2", prompt="a", n=2)
    with pytest.raises(openai.RateLimitError) as err:  # 2 + 2 > 3
        client.images.generate(model="gpt-image-2", prompt="b", n=2)
    assert err.value.code == "insufficient_quota" and err.value.type == "insufficient_quota"
    assert "retry-after" not in err.value.response.headers
    client.images.generate(model="gpt-image-2", prompt="c")
    with pytest.raises(openai.RateLimitError):
        client.images.generate(model="gpt-image-2", prompt="d")
    assert sim.stats()["images_billed"] == 3 and sim.stats()["quota_exceeded"] == 2


def test_moderation(client, sim):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="gpt-image-2", prompt="something FORBIDDEN here")
    e = err.value
    assert e.code == "moderation_blocked" and e.type == "image_generation_user_error"
    assert e.body["moderation_details"]["moderation_stage"] == "input"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="dall-e-3", prompt="forbidden")
    assert (
        err.value.code == "content_policy_violation" and err.value.type == "invalid_request_error"
    )
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(
            model="gpt-image-1", image=("a.png", png_bytes(), "image/png"), prompt="forbidden edit"
        )
    assert err.value.code == "moderation_blocked"
    sim.configure(moderation_word="")
    assert client.images.generate(model="gpt-image-2", prompt="forbidden").data
    stats = sim.stats()
    assert stats["moderated"] == 3 and stats["images_billed"] == 1


# --------------------------------------------------------------------------- faults and latency
def test_server_errors(client, sim):
    sim.configure(error_rate=1.0)
    codes = set()
    for _ in range(12):
        with pytest.raises(openai.InternalServerError) as err:
            client.images.generate(model="gpt-image-2", prompt="x")
        codes.add(err.value.status_code)
        assert err.value.type == "server_error"
    assert codes == {500, 503}
    stats = sim.stats()
    assert stats["faults"]["error"] == 12 and stats["images_billed"] == 0


def test_drop_is_billed_then_transport_error(client, sim, http):
    sim.configure(drop_rate=1.0)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        http.post("/v1/images/generations", json={"model": "gpt-image-2", "prompt": "x", "n": 2})
    with pytest.raises(openai.APIConnectionError):
        client.images.generate(model="gpt-image-2", prompt="y")
    stats = sim.stats()
    assert (
        stats["faults"]["drop"] == 2 and stats["images_billed"] == 3 and stats["requests_ok"] == 0
    )
    sim.configure(drop_rate=0.0)
    assert (
        http.post(
            "/v1/images/generations", json={"model": "gpt-image-2", "prompt": "z"}
        ).status_code
        == 200
    )


def test_malformed_bodies(http, sim):
    sim.configure(malformed_rate=1.0)
    kinds = set()
    for _ in range(10):
        r = http.post("/v1/images/generations", json={"model": "gpt-image-2", "prompt": "x"})
        assert r.status_code == 200
        try:
            body = r.json()
        except json.JSONDecodeError:
            kinds.add("broken")
        else:
            assert "data" not in body
            kinds.add("no-data")
    assert kinds == {"broken", "no-data"}
    assert sim.stats()["images_billed"] == 10


def test_stall_times_out_client_and_is_not_billed(sim, http):
    sim.configure(stall_rate=1.0, stall_seconds=30)
    with pytest.raises(httpx.ReadTimeout):
        http.post(
            "/v1/images/generations", json={"model": "gpt-image-2", "prompt": "x"}, timeout=0.3
        )
    deadline = time.monotonic() + 3
    while sim.stats()["client_disconnects"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = sim.stats()
    assert (
        stats["client_disconnects"] == 1 and stats["in_flight"] == 0 and stats["images_billed"] == 0
    )
    assert stats["faults"]["stall"] == 1


def test_latency_concurrency_and_peak_in_flight(sim, client):
    sim.configure(latency=0.3)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda i: client.images.generate(model="gpt-image-2", prompt=f"p{i}"), range(8)
            )
        )
    elapsed = time.monotonic() - start
    assert len(results) == 8 and elapsed >= 0.3  # the latency is served
    stats = sim.stats()
    # concurrently, not one after another
    assert stats["peak_in_flight"] >= 6 and stats["in_flight"] == 0 and stats["requests_ok"] == 8


def test_seeded_faults_are_reproducible(http, sim):
    sim.configure(error_rate=0.3, malformed_rate=0.2, latency="uniform:0,0.01")

    def run() -> list[int | str]:
        out: list[int | str] = []
        for i in range(15):
            r = http.post(
                "/v1/images/generations", json={"model": "gpt-image-2", "prompt": f"p{i}"}
            )
            out.append(
                r.status_code if r.status_code != 200 or "data" in r.text[:40] else "malformed"
            )
        return out

    first = run()
    sim.reset()  # reseeds
    assert run() == first
    assert len(set(first)) > 1


# --------------------------------------------------------------------------- control endpoints
def test_stats_reset_and_runtime_config(http, sim):
    http.post("/v1/images/generations", json={"model": "gpt-image-2", "prompt": "x", "n": 2})
    http.post("/v1/images/generations", json={"model": "dall-e-3", "prompt": "x"})
    stats = http.get("/v1/_sim/stats").json()
    assert stats["requests_seen"] == 2 and stats["requests_ok"] == 2 and stats["images_billed"] == 3
    assert stats["per_model"]["gpt-image-2"] == {"requests": 1, "ok": 1, "images": 2}
    assert stats["status"] == {"200": 2}
    r = http.post("/v1/_sim/config", json={"rpm": 100, "ipm": 50, "latency": "longtail:0.01,0.05"})
    assert r.status_code == 200 and r.json()["ipm"] == 50
    h = http.post("/v1/images/generations", json={"model": "gpt-image-2", "prompt": "x"}).headers
    assert h["x-ratelimit-limit-requests"] == "100" and h["x-ratelimit-limit-images"] == "50"
    assert (
        h["x-ratelimit-remaining-images"] == "46"
    )  # windows count traffic even while no limit was set
    bad = http.post("/v1/_sim/config", json={"no_such_knob": 1})
    assert bad.status_code == 400 and sim.config.ipm == 50
    bad = http.post("/v1/_sim/config", json={"error_rate": 0.8, "drop_rate": 0.5})
    assert bad.status_code == 400 and sim.config.error_rate == 0.0  # all-or-nothing
    assert http.post("/v1/_sim/reset").status_code == 200
    assert http.get("/v1/_sim/stats").json()["requests_seen"] == 0


def test_models_listing(http):
    names = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert "gpt-image-2" in names and "dall-e-3" in names


def test_subprocess_cli():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imagebatch.simulator",
            "--port",
            "0",
            "--ipm",
            "5",
            "--latency",
            "uniform:0,0.01",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://\S+/v1)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = m.group(1)
        r = httpx.post(
            base + "/images/generations",
            json={"model": "gpt-image-2", "prompt": "x"},
            headers={"Authorization": "Bearer k"},
        )
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-images"] == "5"
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------------- units
def test_go_duration():
    assert [go_duration(s) for s in (0, 0.2401, 0.24, 1, 1.5, 60, 360, 3725.5)] == [
        "0s",
        "241ms",
        "240ms",
        "1s",
        "1.5s",
        "1m0s",
        "6m0s",
        "1h2m5.5s",
    ]


def test_sliding_window_exact():
    w = SlidingWindow()
    w.add(2, now=0.0)
    w.add(1, now=10.0)
    assert w.wait_for(1, 3, now=20.0, window=60) == pytest.approx(
        40.0
    )  # first event frees 2 at t=60
    assert w.wait_for(3, 3, now=20.0, window=60) == pytest.approx(50.0)  # needs both gone
    assert w.wait_for(4, 3, now=20.0, window=60) is None
    assert w.wait_for(1, 3, now=60.0, window=60) == 0.0
    limits = RateLimits()
    assert limits.admit(2, rpm=0, ipm=2, window=1, now=0.0) is None
    rej = limits.admit(1, rpm=0, ipm=2, window=1, now=0.5)
    assert rej.bucket == "images" and rej.wait == pytest.approx(0.5) and rej.used == 2
    assert limits.images.used(0.5, 1) == 2  # the rejection counted nothing


def test_config_parsing():
    assert parse_latency(0.5).describe() == "fixed:0.5"
    assert parse_latency("uniform:0.1,0.3").kind == "uniform"
    tail = parse_latency("longtail:2,30")
    import random

    rng = random.Random(1)
    samples = [tail.sample(rng) for _ in range(2000)]
    assert max(samples) <= 30 and 1.5 < sorted(samples)[1000] < 2.6
    with pytest.raises(ValueError):
        parse_latency("uniform:3,1")
    cfg = SimConfig.from_dict(
        {"ipm": "5", "refuse_retired": "true", "latency": {"kind": "uniform", "min": 0, "max": 1}}
    )
    assert cfg.ipm == 5 and cfg.refuse_retired is True and cfg.latency == "uniform:0,1"
    with pytest.raises(ValueError):
        cfg.update(ipm=-1)
    assert cfg.ipm == 5


def test_render_cost_and_cache():
    cache = RenderCache(8)
    start = time.perf_counter()
    for i in range(20):
        render_image(f"benchmark prompt {i}", 0, "1024x1024", "png", cache=cache)
    per_image_ms = (time.perf_counter() - start) / 20 * 1000
    assert per_image_ms < 40  # ~3 ms on a quiet core; generous for loaded CI machines
    assert len(cache) == 8
    again = render_image("benchmark prompt 19", 0, "1024x1024", "png", cache=cache)
    assert cache.hits == 1 and again == render_image(
        "benchmark prompt 19", 0, "1024x1024", "png", cache=None
    )


def test_a_minute_window_is_named_as_openai_names_it():
    for bucket, label in (
        ("images", "images per min (IPM)"),
        ("requests", "requests per min (RPM)"),
    ):
        failure = rate_limit_failure("gpt-image-2", "org-x", Rejection(bucket, 5, 5, 1, 0.24))
        assert failure.message == (
            f"Rate limit reached for gpt-image-2 in organization org-x on {label}: Limit 5, "
            "Used 5, Requested 1. Please try again in 240ms. "
            "Visit https://platform.openai.com/account/rate-limits to learn more."
        )
