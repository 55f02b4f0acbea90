"""Simulated edits change only the area the mask opens, so a person can see where it was.

The real API repaints where the mask's alpha is 0 (with no mask, dall-e-2 repaints where the
image itself is transparent; a GPT image model may redraw it all) and keeps the rest of the
source. The simulator does the same
with its placeholder picture: the rendered image shows through the repaint area, the source
(scaled to the output size) everywhere else.
"""

from __future__ import annotations

import io

from PIL import Image

_WHITE = (255, 255, 255, 255)


def _decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def repaint_area(
    source: bytes, mask: bytes | None, size: tuple[int, int], alpha_is_mask: bool
) -> Image.Image | None:
    """Mode L at `size`: 255 where the picture may change, 0 where the source is kept.
    None when the whole picture may change (no mask, and the source's own transparency is
    not a mask for this model or it has none)."""
    if mask is not None:
        alpha = _decoded(mask).convert("RGBA").getchannel("A")
    elif not alpha_is_mask:
        return None
    else:
        src = _decoded(source)
        if src.mode not in ("RGBA", "LA", "PA") and "transparency" not in src.info:
            return None
        alpha = src.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] != 0:
            return None
    alpha = alpha.resize(size, Image.Resampling.NEAREST)
    return alpha.point(lambda v: 255 if v == 0 else 0)


def _encode(img: Image.Image, fmt: str, compression: int | None) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        quality = 90 if compression is None else max(1, min(95, compression))
        img.convert("RGB").save(buf, "JPEG", quality=quality)
    elif fmt == "webp":
        if compression is None or compression >= 100:
            img.save(buf, "WEBP", lossless=True, quality=0, method=0)
        else:
            img.save(buf, "WEBP", quality=max(0, compression), method=0)
    else:
        img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def masked_edit(
    rendered: bytes,
    source: bytes,
    mask: bytes | None,
    fmt: str,
    compression: int | None,
    transparent: bool,
    alpha_is_mask: bool = False,
) -> bytes:
    """`rendered` inside the repaint area, the source (scaled to fit) outside it."""
    new = _decoded(rendered).convert("RGBA")
    area = repaint_area(source, mask, new.size, alpha_is_mask)
    if area is None:
        return rendered
    kept = _decoded(source).convert("RGBA").resize(new.size, Image.Resampling.BICUBIC)
    out = Image.composite(new, kept, area)
    if not transparent:
        out = Image.alpha_composite(Image.new("RGBA", out.size, _WHITE), out).convert("RGB")
    return _encode(out, fmt, compression)
