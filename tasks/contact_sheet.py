"""Contact sheet: one PNG with the first images of a run, for a chat message or an artifact.

Built from the thumbnails (already small), so it costs one small bitmap per cell; off
unless `[gallery] contact_sheet` asks for a number of images.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from imagebatch.tasks.files import write_atomic

SHEET_NAME = "contact_sheet.png"
LABEL_HEIGHT = 18
PAD = 6


def write_contact_sheet(
    out_dir: Path, cells: list[tuple[str, str]], cell: int = 256, columns: int = 6
) -> Path | None:
    """Write `contact_sheet.png` from (thumbnail path, label) pairs; None when there are none.

    Each thumbnail is pasted centred in a `cell`-pixel square with its label underneath."""
    if not cells:
        return None
    columns = max(1, min(columns, len(cells)))
    rows = math.ceil(len(cells) / columns)
    width = columns * (cell + PAD) + PAD
    height = rows * (cell + LABEL_HEIGHT + PAD) + PAD
    sheet = Image.new("RGB", (width, height), (246, 246, 244))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (thumb, label) in enumerate(cells):
        x = PAD + (i % columns) * (cell + PAD)
        y = PAD + (i // columns) * (cell + LABEL_HEIGHT + PAD)
        try:
            with Image.open(out_dir / thumb) as img:
                img.thumbnail((cell, cell))
                tile = img.convert("RGBA")
        except OSError:
            continue
        offset = (x + (cell - tile.width) // 2, y + (cell - tile.height) // 2)
        sheet.paste(tile, offset, tile)
        draw.text((x, y + cell + 3), _fit(draw, label, cell, font), fill=(40, 40, 38), font=font)
    buf = io.BytesIO()
    sheet.save(buf, "PNG", optimize=True)
    path = out_dir / SHEET_NAME
    write_atomic(path, buf.getvalue())
    return path


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> str:
    """`text` cut (with an ellipsis) to fit `width` pixels."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
