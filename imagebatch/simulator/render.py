"""Deterministic placeholder images: the same (prompt, index, size, format) always gives the same bytes.

Speed is the point. The picture is drawn on a palette ("P" mode) canvas whose longest
edge is `DRAW_EDGE` pixels, upscaled with NEAREST to the requested size and encoded with
the cheapest settings (a hand-written 8-bit palette PNG at zlib level 1, libjpeg-turbo,
lossless WebP at method 0). A 1024x1024 PNG costs about 3 ms on one core; encoded bytes
are kept in an LRU cache.

The palette and the shapes come from a SHA-256 of prompt+index, so two prompts give
visibly different pictures; the printable-ASCII part of the prompt is written on it.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import struct
import textwrap
import threading
import zlib
from collections import OrderedDict
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from imagebatch.configs.registry import parse_size as parse_wxh

DRAW_EDGE = 256  # longest edge of the canvas actually drawn on
DEFAULT_SIZE = (1024, 1024)
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# palette layout of the drawing canvas
_BG = 0  # background (transparent when requested)
_RAMP = 1  # 1..64: background gradient
_RAMP_N = 64
_SHAPES = 70  # 70..77: shape colours
_TEXT_BG = 250
_TEXT_FG = 251
_LABEL_FG = 252


def parse_size(size: str | None) -> tuple[int, int]:
    """'1536x1024' -> (1536, 1024); 'auto', '' and None -> 1024x1024."""
    if not size or size == "auto":
        return DEFAULT_SIZE
    parsed = parse_wxh(size)
    if parsed is None:
        raise ValueError(f"bad size {size!r}")
    return parsed


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in 6x11 bitmap font: 30x cheaper than FreeType and needs no font file."""
    try:
        return ImageFont.load_default_imagefont()
    except Exception:  # pragma: no cover - very old or unusual Pillow builds
        return ImageFont.load_default()


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _ascii(text: str) -> str:
    cleaned = "".join(c if 32 <= ord(c) < 127 else " " for c in text)
    return " ".join(cleaned.split())


def draw(
    prompt: str,
    index: int,
    width: int,
    height: int,
    *,
    transparent: bool = False,
    text: bool = True,
) -> Image.Image:
    """The low-resolution "P" canvas for one image (not yet upscaled)."""
    digest = hashlib.sha256(f"{prompt}\x00{index}".encode("utf-8", "surrogatepass")).digest()
    scale = DRAW_EDGE / max(width, height)
    lw, lh = max(8, round(width * scale)), max(8, round(height * scale))
    img = Image.new("P", (lw, lh), _BG)
    img.putpalette(_palette(digest))
    d = ImageDraw.Draw(img)
    if not transparent:
        bands = min(_RAMP_N, lh)
        for i in range(bands):
            y0, y1 = i * lh // bands, (i + 1) * lh // bands
            d.rectangle((0, y0, lw, y1), fill=_RAMP + i * (_RAMP_N - 1) // max(1, bands - 1))
    _shapes(d, digest, lw, lh)
    font = _font()
    d.text((3, 2), f"#{index + 1} {digest[:3].hex()}", font=font, fill=_LABEL_FG)
    words = _ascii(prompt) if text else ""
    if words:
        _caption(d, font, words, lw, lh)
    return img


def _palette(digest: bytes) -> list[int]:
    """Background, a gradient ramp, eight shape colours and the text colours, from the digest."""
    hue = digest[0] / 255
    scheme = digest[1] % 3  # analogous, complementary, triadic
    spread = (0.08, 0.5, 1 / 3)[scheme]
    top = _rgb(hue, 0.35 + digest[2] / 600, 0.35 + digest[3] / 500)
    bottom = _rgb(hue + spread, 0.55 + digest[4] / 800, 0.75 + digest[5] / 1200)

    palette = [0] * 768

    def put(i: int, rgb: tuple[int, int, int]) -> None:
        palette[3 * i : 3 * i + 3] = rgb

    put(_BG, top)
    for i in range(_RAMP_N):
        t = i / (_RAMP_N - 1)
        put(_RAMP + i, tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))  # type: ignore[arg-type]
    for j in range(8):
        put(
            _SHAPES + j,
            _rgb(
                hue + spread * (j % 3) + digest[6 + j] / 1024,
                0.6 + (digest[14 + j] % 40) / 100,
                0.55 + (digest[22 + j] % 45) / 100,
            ),
        )
    put(_TEXT_BG, (16, 16, 20))
    put(_TEXT_FG, (250, 250, 245))
    put(_LABEL_FG, (255, 255, 255))
    return palette


def _shapes(d: ImageDraw.ImageDraw, digest: bytes, lw: int, lh: int) -> None:
    """Five to nine ellipses, boxes and triangles placed and sized by the digest."""
    count = 5 + digest[30] % 5
    for k in range(count):
        b0, b1, b2, b3 = (digest[(k * 4 + o) % 32] for o in range(4))
        b4 = digest[(k * 7 + 5) % 32]
        cx, cy = b0 * lw // 255, b1 * lh // 255
        rx = max(4, (b2 % 64 + 16) * lw // 256)
        ry = max(4, (b3 % 64 + 16) * lh // 256)
        fill = _SHAPES + (k + b4) % 8
        kind = (b4 >> 3) % 3
        if kind == 0:
            d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
        elif kind == 1:
            d.rectangle((cx - rx, cy - ry // 2, cx + rx // 2, cy + ry), fill=fill)
        else:
            d.polygon([(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)], fill=fill)


def _caption(
    d: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    words: str,
    lw: int,
    lh: int,
) -> None:
    """Up to four lines of the prompt on a dark band at the bottom."""
    per_line = max(8, (lw - 8) // 6)
    wrapped = textwrap.wrap(words, per_line)
    lines = wrapped[:4]
    if len(wrapped) > 4:
        lines[-1] = lines[-1][: per_line - 3] + "..."
    line_h = 12
    y0 = lh - line_h * len(lines) - 4
    d.rectangle((0, y0 - 2, lw, lh), fill=_TEXT_BG)
    for i, line in enumerate(lines):
        d.text((4, y0 + i * line_h), line, font=font, fill=_TEXT_FG)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_nearest(img: Image.Image, width: int, height: int, transparent: bool) -> bytes:
    """8-bit palette PNG of `img` upscaled to width x height with nearest-neighbour.

    Pillow's own PNG writer spends ~4 ms per 1024x1024 image here. Writing the file
    directly halves that: each canvas row is stretched once (filter None) and its
    vertical repeats become PNG "Up"-filtered rows of zeros, which zlib level 1 eats fast.
    """
    _lw, lh = img.size
    raw = img.resize((width, lh), Image.Resampling.NEAREST).tobytes()
    repeat = b"\x02" + bytes(width)  # filter Up: same as the row above
    rows: list[bytes] = []
    prev = -1
    for y in range(height):
        src = y * lh // height
        if src == prev:
            rows.append(repeat)
        else:
            rows.append(b"\x00" + raw[src * width : (src + 1) * width])
            prev = src
    idat = zlib.compress(b"".join(rows), 1)
    palette = bytes(img.getpalette() or [])[:768].ljust(768, b"\x00")
    parts = [
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)),
        _chunk(b"PLTE", palette),
    ]
    if transparent:
        parts.append(_chunk(b"tRNS", bytes([0])))  # index _BG fully transparent, the rest opaque
    parts += [_chunk(b"IDAT", idat), _chunk(b"IEND", b"")]
    return b"".join(parts)


def encode(
    img: Image.Image, width: int, height: int, fmt: str, compression: int | None, transparent: bool
) -> bytes:
    """Upscale the canvas with NEAREST and encode it."""
    if fmt == "png":
        return _png_nearest(img, width, height, transparent)
    buf = io.BytesIO()
    if fmt == "jpeg":
        big = img.convert("RGB").resize((width, height), Image.Resampling.NEAREST)
        quality = 90 if compression is None else max(1, min(95, compression))
        big.save(buf, "JPEG", quality=quality)
    elif fmt == "webp":
        if transparent:
            img = img.copy()
            img.info["transparency"] = _BG
            small = img.convert("RGBA")
        else:
            small = img.convert("RGB")
        big = small.resize((width, height), Image.Resampling.NEAREST)
        if compression is None or compression >= 100:
            big.save(buf, "WEBP", lossless=True, quality=0, method=0)
        else:
            big.save(buf, "WEBP", quality=max(0, compression), method=0)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buf.getvalue()


class RenderCache:
    """Thread-safe LRU of encoded images keyed by everything that shapes the bytes."""

    def __init__(self, maxsize: int = 512) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            self.misses += 1
            if self.maxsize <= 0:
                return
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)


_default_cache = RenderCache()


def render_image(
    prompt: str,
    index: int = 0,
    size: str | tuple[int, int] = "1024x1024",
    fmt: str = "png",
    compression: int | None = None,
    *,
    transparent: bool = False,
    text: bool = True,
    cache: RenderCache | None = _default_cache,
) -> bytes:
    """Encoded bytes of image number `index` for `prompt` at `size` ('auto' means 1024x1024)."""
    width, height = parse_size(size) if isinstance(size, str) else size
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt == "png":
        compression = None  # does not change PNG bytes
    key = (prompt, index, width, height, fmt, compression, transparent, text)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    data = encode(
        draw(prompt, index, width, height, transparent=transparent, text=text),
        width,
        height,
        fmt,
        compression,
        transparent,
    )
    if cache is not None:
        cache.put(key, data)
    return data
