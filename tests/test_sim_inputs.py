"""The simulator's edit and variation endpoints: the real API's input rules, and edits that
change only the masked area of the source. Driven through the official openai SDK."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from openai import OpenAI
from PIL import Image

from imagebatch.simulator import SimConfig, SimulatorServer


@pytest.fixture(scope="module")
def client():
    with (
        SimulatorServer(SimConfig(latency=0.0)) as sim,
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0, timeout=30) as c,
    ):
        yield c


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decoded(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def halves(size=(256, 256)) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", size, (30, 60, 220))
    img.paste((220, 30, 30), (0, 0, size[0] // 2, size[1]))
    return img


def left_half_mask(size=(256, 256)) -> Image.Image:
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    return mask


def refused(call, param: str, fragment: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        call()
    assert err.value.param == param and fragment in err.value.message, err.value.message


def test_dall_e_2_edit_input_rules(client):
    def edit(image: bytes, mask: bytes | None = None):
        files = {"mask": ("m.png", mask, "image/png")} if mask else {}
        return lambda: client.images.edit(
            model="dall-e-2",
            image=("i.png", image, "image/png"),
            prompt="x",
            size="256x256",
            **files,
        )

    rgba = halves().convert("RGBA")
    refused(edit(encoded(halves())), "image", "format must be in ['RGBA', 'LA', 'L'], got RGB")
    refused(edit(encoded(rgba.resize((256, 128)))), "image", "square")
    refused(edit(encoded(halves().convert("RGB"), "JPEG")), "image", "Supported formats: png")
    big = encoded(rgba) + b"\0" * 4_000_000  # a PNG of 4 MB or more
    refused(edit(big), "image", "under 4,000,000 bytes")
    truncated = encoded(Image.effect_noise((256, 256), 60).convert("RGBA"))
    refused(edit(truncated[: len(truncated) // 2]), "image", "not a readable image")
    refused(edit(encoded(rgba), encoded(halves())), "mask", "alpha channel")
    refused(edit(encoded(rgba), encoded(left_half_mask((128, 128)))), "mask", "same dimensions")
    ok = edit(encoded(rgba), encoded(left_half_mask()))()
    assert ok.data[0].url


def test_variation_input_rules(client):
    def variation(image: bytes):
        return lambda: client.images.create_variation(
            model="dall-e-2", image=("i.png", image, "image/png"), size="256x256"
        )

    refused(variation(encoded(halves((256, 200)))), "image", "square")
    refused(variation(encoded(halves(), "JPEG")), "image", "Supported formats: png")
    refused(variation(encoded(halves()) + b"\0" * 4_000_000), "image", "under 4,000,000")
    assert variation(encoded(halves()))().data[0].url


def test_gpt_image_edit_input_rules(client):
    def edit(images: list[tuple[str, bytes, str]]):
        return lambda: client.images.edit(model="gpt-image-1.5", image=images, prompt="x")

    png = ("a.png", encoded(halves()), "image/png")
    refused(edit([png] * 17), "image", "at most 16")
    gif = ("a.png", encoded(halves(), "GIF"), "image/png")  # GIF bytes, whatever the label
    refused(edit([gif]), "image", "Supported formats")
    huge = ("a.png", encoded(halves()) + b"\0" * 50_000_000, "image/png")
    refused(edit([huge]), "image", "under 50,000,000 bytes")
    jpeg = ("b.jpg", encoded(halves(), "JPEG"), "image/jpeg")
    webp = ("c.webp", encoded(halves(), "WEBP"), "image/webp")
    assert edit([png, jpeg, webp] + [png] * 13)().data


def test_an_edit_changes_only_the_masked_area(client):
    source = halves()
    r = client.images.edit(
        model="gpt-image-1.5",
        image=("i.png", encoded(source), "image/png"),
        mask=("m.png", encoded(left_half_mask()), "image/png"),
        prompt="a field of flowers",
        size="1024x1024",
    )
    out = decoded(r.data[0].b64_json).convert("RGB")
    assert out.size == (1024, 1024)
    # right half (mask opaque): the blue source, kept (away from the scaled edge)
    assert set(out.crop((520, 0, 1024, 1024)).getdata()) == {(30, 60, 220)}
    # left half (mask transparent): the new picture, hardly any of the red source left
    left = list(out.crop((0, 0, 504, 1024)).getdata())
    assert sum(1 for p in left if p == (220, 30, 30)) < len(left) // 10


def test_dall_e_2_without_a_mask_repaints_only_the_transparent_area(client):
    source = halves().convert("RGBA")
    source.paste((0, 0, 0, 0), (0, 0, 256, 64))  # the top quarter is transparent
    r = client.images.edit(
        model="dall-e-2",
        image=("i.png", encoded(source), "image/png"),
        prompt="a sky",
        size="256x256",
        response_format="b64_json",
    )
    out = decoded(r.data[0].b64_json).convert("RGB")
    kept = source.convert("RGB")
    assert out.crop((0, 64, 256, 256)).tobytes() == kept.crop((0, 64, 256, 256)).tobytes()
    assert len(set(out.crop((0, 0, 256, 64)).getdata())) > 2  # a picture, not flat black
