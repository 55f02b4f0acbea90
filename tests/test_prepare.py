"""Preparation of sources and masks: every conversion path, pixel-exact mask alignment under
rotation, crop and pad, squeezing under byte limits, and the checks validation makes first."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from imagebatch.configs.registry import Registry
from imagebatch.tasks.prepare import (
    InputRules,
    PrepOptions,
    SourceError,
    input_rules,
    inspect_source,
    prepare_inputs,
    resolve_source,
)

REGISTRY = Registry.load()
DALLE2_EDIT = input_rules(REGISTRY.models["dall-e-2"], "edit")
DALLE2_VAR = input_rules(REGISTRY.models["dall-e-2"], "variation")
GPT_EDIT = input_rules(REGISTRY.models["gpt-image-2"], "edit")
RED = (220, 20, 20)
ORIENTATION = 0x0112


def src(path: Path):
    return inspect_source(path, 89_478_485)


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def save_oriented(display: Image.Image, path: Path, orientation: int, fmt: str = "PNG") -> None:
    """Store `display` so that a viewer applying EXIF `orientation` shows it as it is."""
    undo = {
        1: None,
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    stored = display.transpose(undo) if undo is not None else display
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored.save(path, fmt, exif=exif)


def marked(size: tuple[int, int], rect: tuple[int, int, int, int], mode: str = "RGB"):
    """A grey picture with a red rectangle, and its black-and-white mask (white = repaint)."""
    img = Image.new(mode, size, (90, 90, 90) if mode == "RGB" else 90)
    img.paste(RED if mode == "RGB" else 200, rect)
    mask = Image.new("L", size, 0)
    mask.paste(255, rect)
    return img, mask


def red_pixels(img: Image.Image) -> set[tuple[int, int]]:
    rgb = img.convert("RGB")
    w, h = rgb.size
    px = rgb.load()
    return {(x, y) for y in range(h) for x in range(w) if px[x, y] == RED}


def repaint_pixels(mask: Image.Image) -> set[tuple[int, int]]:
    alpha = mask.getchannel("A")
    w, h = alpha.size
    px = alpha.load()
    return {(x, y) for y in range(h) for x in range(w) if px[x, y] == 0}


def rect_pixels(rect: tuple[int, int, int, int]) -> set[tuple[int, int]]:
    x0, y0, x1, y1 = rect
    return {(x, y) for y in range(y0, y1) for x in range(x0, x1)}


# ---------------------------------------------------------------- conversion paths


def _sources(tmp: Path) -> dict[str, Path]:
    """One file per kind of source people actually hold."""
    out = {}
    cmyk = Image.new("CMYK", (60, 40), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(out.setdefault("cmyk", tmp / "cmyk.jpg"), "JPEG", quality=95)
    pal = Image.new("RGB", (60, 40), RED).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.save(out.setdefault("palette", tmp / "palette.png"))
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    pal_t.save(out.setdefault("palette_transparent", tmp / "palette_t.png"), transparency=0)
    grey16 = Image.new("I;16", (60, 40), 0x8080)
    grey16.save(out.setdefault("grey16", tmp / "grey16.png"))
    Image.new("LA", (60, 40), (128, 200)).save(out.setdefault("la", tmp / "la.png"))
    Image.new("1", (60, 40), 1).save(out.setdefault("bilevel", tmp / "bilevel.png"))
    Image.new("RGB", (60, 40), RED).save(out.setdefault("tiff", tmp / "photo.tiff"))
    Image.new("RGB", (60, 40), RED).save(out.setdefault("bmp", tmp / "photo.bmp"))
    Image.new("RGB", (60, 40), RED).save(out.setdefault("webp", tmp / "photo.webp"), lossless=True)
    Image.new("RGB", (60, 40), RED).save(out.setdefault("gif", tmp / "anim.gif"))
    Image.new("RGBA", (60, 40), (*RED, 255)).save(out.setdefault("rgba", tmp / "rgba.png"))
    return out


EXPECTED_COLOUR = {
    "cmyk": (255, 0, 0),  # C0 M100 Y100 K0, converted without a profile
    "palette": RED,
    "grey16": (128, 128, 128),
    "la": (128, 128, 128),
    "bilevel": (255, 255, 255),
    "tiff": RED,
    "bmp": RED,
    "webp": RED,
    "gif": RED,
    "rgba": RED,
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_COLOUR))
@pytest.mark.parametrize(
    "rules, operation",
    [(DALLE2_EDIT, "edit"), (DALLE2_VAR, "variation"), (GPT_EDIT, "edit")],
    ids=["dall-e-2-edit", "dall-e-2-variation", "gpt-image-2-edit"],
)
def test_every_mode_and_format_becomes_what_the_endpoint_accepts(tmp_path, kind, rules, operation):
    path = _sources(tmp_path)[kind]
    fit = "pad" if operation == "edit" else "crop"
    out = prepare_inputs([src(path)], None, rules, PrepOptions(fit, "white", "", "256x256"))
    (file,) = out.images
    img = decoded(file.data)
    assert (img.format or "").lower() in rules.formats
    assert img.mode in rules.modes
    assert len(file.data) < rules.max_bytes
    if rules.square:
        assert img.size == (256, 256)
        centre = img.convert("RGB").getpixel((128, 128))
    else:
        assert img.size == (60, 40)  # GPT image models take any shape: nothing resized
        centre = img.convert("RGB").getpixel((30, 20))
    want = EXPECTED_COLOUR[kind]
    assert all(abs(a - b) <= 6 for a, b in zip(centre, want)), (kind, centre, want)


def test_transparent_palette_keeps_its_transparency(tmp_path):
    path = _sources(tmp_path)["palette_transparent"]
    out = prepare_inputs([src(path)], None, GPT_EDIT, PrepOptions("", "", "", ""))
    img = decoded(out.images[0].data)
    assert img.mode == "RGBA" and img.getchannel("A").getextrema()[0] == 0
    assert "palette -> RGBA" in out.description


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g.png"
    ramp = Image.new("I;16", (3, 1))
    ramp.putpixel((0, 0), 0)
    ramp.putpixel((1, 0), 0x4000)
    ramp.putpixel((2, 0), 0xFFFF)
    ramp.save(path)
    out = prepare_inputs([src(path)], None, GPT_EDIT, PrepOptions("", "", "", ""))
    img = decoded(out.images[0].data).convert("L")
    assert [img.getpixel((x, 0)) for x in range(3)] == [0, 64, 255]
    assert "16-bit grey -> RGB" in out.description


def test_a_source_the_model_takes_as_it_is_is_sent_byte_for_byte(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (300, 200), RED).save(path, "JPEG")
    out = prepare_inputs([src(path)], None, GPT_EDIT, PrepOptions("", "", "", ""))
    assert out.images[0].data == path.read_bytes()
    assert out.description == "sent as is"


def test_exif_rotated_jpeg_is_turned_upright_and_cropped_for_a_variation(tmp_path):
    display = Image.new("RGB", (640, 320), (90, 90, 90))
    display.paste(RED, (400, 0, 640, 320))  # the right part is red as a person sees it
    path = tmp_path / "phone.jpg"
    save_oriented(display, path, 6, "JPEG")
    found = src(path)
    assert (found.width, found.height) == (320, 640) and found.display_size == (640, 320)
    out = prepare_inputs([found], None, DALLE2_VAR, PrepOptions("crop", "white", "", "256x256"))
    img = decoded(out.images[0].data).convert("RGB")
    assert img.size == (256, 256)
    # the centre crop keeps x 160..480 of the display, so red is its right quarter
    assert img.getpixel((250, 128))[0] > 200 and img.getpixel((10, 128))[0] < 120
    assert out.description.startswith("rotated 90, cropped 640x320 -> 320x320, resized to 256x256")
    assert "resized to 256x256" in out.description and "PNG" in out.description


# ---------------------------------------------------------------- masks, pixel-exact


def _edit(tmp_path, display_size, rect, *, orientation, fit, size, mask_kind="bw", pad="white"):
    image, bw = marked(display_size, rect)
    save_oriented(image, tmp_path / "img.png", orientation)
    mask_path = tmp_path / "mask.png"
    if mask_kind == "bw":
        bw.save(mask_path)
    elif mask_kind == "alpha":  # transparent where to repaint
        rgba = Image.new("RGBA", display_size, (0, 0, 0, 255))
        rgba.putalpha(bw.point(lambda v: 255 - v))
        rgba.save(mask_path)
    elif mask_kind == "stored":  # drawn on the stored (un-rotated) pixels
        save_oriented(bw, mask_path, orientation)
        Image.open(mask_path).save(mask_path)  # drop the EXIF: plain pixels as stored
    elif mask_kind == "half":
        bw.resize((display_size[0] // 2, display_size[1] // 2), Image.Resampling.NEAREST).save(
            mask_path
        )
    rules = DALLE2_EDIT if fit else GPT_EDIT
    options = PrepOptions(fit, pad, "white", size)
    return prepare_inputs([src(tmp_path / "img.png")], src(mask_path), rules, options)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("mask_kind", ["bw", "alpha", "stored", "half"])
def test_mask_stays_aligned_under_rotation_and_crop(tmp_path, orientation, mask_kind):
    if mask_kind == "stored" and orientation in (1, 3):
        pytest.skip("same shape stored and displayed: a mask is taken as drawn on the display")
    rect = (300, 40, 420, 200)  # partly cut by the centre crop (x 128..384)
    out = _edit(
        tmp_path,
        (512, 256),
        rect,
        orientation=orientation,
        fit="crop",
        size="256x256",
        mask_kind=mask_kind,
    )
    image, mask = decoded(out.images[0].data), decoded(out.mask.data)
    assert image.size == mask.size == (256, 256)
    expected = rect_pixels((300 - 128, 40, 384 - 128, 200))
    assert red_pixels(image) == expected
    assert repaint_pixels(mask) == expected


@pytest.mark.parametrize("orientation", [1, 6])
def test_mask_stays_aligned_under_pad_and_padding_is_kept_out_of_the_repaint_area(
    tmp_path, orientation
):
    rect = (16, 8, 100, 60)
    out = _edit(tmp_path, (512, 256), rect, orientation=orientation, fit="pad", size="512x512")
    image, mask = decoded(out.images[0].data), decoded(out.mask.data)
    assert image.size == mask.size == (512, 512)
    expected = rect_pixels((16, 8 + 128, 100, 60 + 128))
    assert red_pixels(image) == expected
    assert repaint_pixels(mask) == expected  # the white padding is not repainted
    assert image.convert("RGB").getpixel((5, 5)) == (255, 255, 255)
    assert "padded (white) 512x256 -> 512x512" in out.description


def test_transparent_padding_is_part_of_the_repaint_area(tmp_path):
    rect = (16, 8, 100, 60)
    out = _edit(
        tmp_path, (512, 256), rect, orientation=1, fit="pad", size="512x512", pad="transparent"
    )
    image, mask = decoded(out.images[0].data), decoded(out.mask.data)
    padding = rect_pixels((0, 0, 512, 128)) | rect_pixels((0, 384, 512, 512))
    assert repaint_pixels(mask) == rect_pixels((16, 136, 100, 188)) | padding
    assert image.getchannel("A").getpixel((5, 5)) == 0


def test_mask_follows_resize_and_gpt_rotation_without_square(tmp_path):
    rect = (192, 64, 320, 192)
    out = _edit(tmp_path, (512, 256), rect, orientation=6, fit="crop", size="1024x1024")
    mask = decoded(out.mask.data)
    # crop x 128..384, then x4 (the mask with NEAREST, so its edge stays exact)
    assert repaint_pixels(mask) == rect_pixels((256, 256, 768, 768))
    rect = (300, 40, 420, 200)
    out = _edit(tmp_path, (512, 256), rect, orientation=8, fit="", size="auto")
    image, mask = decoded(out.images[0].data), decoded(out.mask.data)
    assert image.size == mask.size == (512, 256)
    assert red_pixels(image) == repaint_pixels(mask) == rect_pixels(rect)


def test_black_repaints_when_configured_and_alpha_masks_are_used_as_is(tmp_path):
    image, bw = marked((64, 64), (0, 0, 32, 64))
    image.save(tmp_path / "i.png")
    bw.save(tmp_path / "m.png")
    black = prepare_inputs(
        [src(tmp_path / "i.png")],
        src(tmp_path / "m.png"),
        GPT_EDIT,
        PrepOptions("", "", "black", ""),
    )
    assert repaint_pixels(decoded(black.mask.data)) == rect_pixels((32, 0, 64, 64))
    assert "black repaints" in black.description
    alpha = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), (0, 0, 10, 10))
    alpha.save(tmp_path / "a.png")
    same = prepare_inputs(
        [src(tmp_path / "i.png")], src(tmp_path / "a.png"), GPT_EDIT, PrepOptions("", "", "", "")
    )
    assert same.mask.data == (tmp_path / "a.png").read_bytes()
    # An editor's flat RGBA export (alpha all opaque) is read by brightness instead.
    flat = bw.convert("RGBA")
    flat.save(tmp_path / "flat.png")
    read = prepare_inputs(
        [src(tmp_path / "i.png")],
        src(tmp_path / "flat.png"),
        GPT_EDIT,
        PrepOptions("", "", "white", ""),
    )
    assert repaint_pixels(decoded(read.mask.data)) == rect_pixels((0, 0, 32, 64))
    assert "alpha all opaque" in read.description


def test_jpeg_draft_decoding_keeps_the_mask_aligned(tmp_path):
    """A 2048x1024 JPEG headed for 256x256 is decoded at 1/4 scale; the mask follows."""
    image, bw = marked((2048, 1024), (1200, 160, 1600, 800))
    image.save(tmp_path / "big.jpg", quality=95)
    bw.save(tmp_path / "big_mask.png")
    out = prepare_inputs(
        [src(tmp_path / "big.jpg")],
        src(tmp_path / "big_mask.png"),
        DALLE2_EDIT,
        PrepOptions("crop", "white", "white", "256x256"),
    )
    assert "decoded at 512x256" in out.description
    assert repaint_pixels(decoded(out.mask.data)) == rect_pixels((300 - 128, 40, 256, 200))


# ---------------------------------------------------------------- byte limits


def noise(size: tuple[int, int]) -> Image.Image:
    return Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))


def test_a_large_noisy_photo_is_squeezed_under_four_mb_for_dall_e_2(tmp_path):
    path = tmp_path / "noisy.jpg"
    noise((3000, 2000)).save(path, "JPEG", quality=98)
    assert path.stat().st_size > 4_000_000
    out = prepare_inputs([src(path)], None, DALLE2_VAR, PrepOptions("crop", "", "", "1024x1024"))
    data = out.images[0].data
    img = decoded(data)
    assert len(data) < 4_000_000 and img.format == "PNG" and img.width == img.height
    assert img.width <= 1024


def test_squeezing_says_what_it_did(tmp_path):
    path = tmp_path / "noisy.png"
    noise((512, 512)).save(path)
    tight = InputRules(("png",), ("RGBA",), True, 300_000, 4_000_000, False, 1)
    out = prepare_inputs([src(path)], None, tight, PrepOptions("crop", "", "", ""))
    img = decoded(out.images[0].data)
    assert len(out.images[0].data) < 300_000 and img.width == img.height < 512
    assert f"downscaled to {img.width}x{img.height} to stay under 300 KB" in out.description
    jpeg_ok = InputRules(("png", "jpeg"), ("RGB", "RGBA"), False, 500_000, 4_000_000, False, 16)
    out = prepare_inputs([src(path)], None, jpeg_ok, PrepOptions("", "", "", ""))
    assert decoded(out.images[0].data).format == "JPEG"
    assert "re-encoded as JPEG to stay under 500 KB" in out.description


# ---------------------------------------------------------------- validation helpers


def _png_header(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 30_000])  # over the guard; over twice the guard
def test_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(side, side))
    with pytest.raises(SourceError, match="decompression-bomb guard"):
        src(path)


def test_truncated_files_are_refused(tmp_path):
    for name, fmt in (("t.png", "PNG"), ("t.jpg", "JPEG")):
        good = io.BytesIO()
        noise((200, 200)).save(good, fmt)
        (tmp_path / name).write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
        with pytest.raises(SourceError, match="truncated or corrupt"):
            src(tmp_path / name)


def test_a_source_changed_after_validation_is_not_sent(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    found = src(path)
    Image.new("RGB", (8, 8), RED).save(path)
    with pytest.raises(SourceError, match="changed after it was checked"):
        prepare_inputs([found], None, GPT_EDIT, PrepOptions("", "", "", ""))


def test_paths_may_not_escape_the_jobs_folder(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "in.png").write_bytes(b"x")
    (tmp_path / "out.png").write_bytes(b"x")
    (jobs / "link.png").symlink_to(tmp_path / "out.png")
    assert resolve_source("in.png", jobs, None, False) == (jobs / "in.png").resolve()
    assert resolve_source(str(jobs / "in.png"), jobs, None, False).name == "in.png"
    for raw in ("../out.png", str(tmp_path / "out.png"), "link.png", "sub/../../out.png"):
        with pytest.raises(SourceError, match="outside"):
            resolve_source(raw, jobs, None, False)
        assert resolve_source(raw, jobs, None, True).name == "out.png"
    # a sources_root: relative paths start there, and must stay inside it
    assert resolve_source("out.png", jobs, tmp_path, False).name == "out.png"
    with pytest.raises(SourceError, match="outside"):
        resolve_source("../x.png", jobs, tmp_path, False)
