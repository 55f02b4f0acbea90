"""The `usage` block of a simulated GPT image response, as the published figures say.

Output tokens per image: the gpt-image-1 family's published table (1024x1024, 1024x1536,
1536x1024 by quality); for models with free sizes (gpt-image-2 and later) the calculator
rule that reproduces OpenAI's published figures (1024x1024 high = 7024, 1536x1024 high =
5488). `xhigh` and `max` have no published figures: the simulator extends the quality axis
(its own assumption, so a client must not take them as prices). Input tokens grow with the
prompt (about four ASCII characters per token, one token per other character) and with
each input image (the vision tile rule). This module is the simulator's own account of
billing, written apart from the client's estimator so tests compare two implementations.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

# gpt-image-1 family, tokens per image by quality and size (community.openai.com figures).
TABLE = {
    "1024x1024": {"low": 272, "medium": 1056, "high": 4160},
    "1024x1536": {"low": 408, "medium": 1584, "high": 6240},
    "1536x1024": {"low": 400, "medium": 1568, "high": 6208},
}
# Quality factors of the free-size rule; xhigh and max are the simulator's extrapolation.
FACTORS = {"low": 16, "medium": 48, "high": 96, "xhigh": 144, "max": 192}
AREA_OFFSET, AREA_SCALE = 2_000_000, 4_000_000
HALF = Fraction(1, 2)


def output_tokens(quality: str, width: int, height: int, free_sizes: bool) -> int:
    """Image output tokens of one image."""
    quality = quality if quality in FACTORS else "medium"
    if free_sizes or f"{width}x{height}" not in TABLE:
        factor = FACTORS[quality]
        short = math.floor(Fraction(factor * min(width, height), max(width, height)) + HALF)
        return math.ceil(Fraction(factor * short * (width * height + AREA_OFFSET), AREA_SCALE))
    row = TABLE[f"{width}x{height}"]
    return row.get(quality, row["high"])


def text_tokens(prompt: str) -> int:
    if not prompt:
        return 0
    ascii_chars = sum(1 for c in prompt if ord(c) < 128)
    return max(1, math.ceil(ascii_chars / 4) + (len(prompt) - ascii_chars))


def image_tokens(width: int, height: int) -> int:
    """Input tokens of one input image: 512 px tiles after fitting 2048 and a 768 short side."""
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 65 + 129 * math.ceil(w / 512) * math.ceil(h / 512)


def usage(
    prompt: str,
    inputs: list[tuple[int, int]],
    quality: str,
    width: int,
    height: int,
    n: int,
    free_sizes: bool,
) -> dict[str, Any]:
    """The response's `usage` for one call of `n` images."""
    text = text_tokens(prompt)
    images_in = sum(image_tokens(w, h) for w, h in inputs)
    out = output_tokens(quality, width, height, free_sizes) * n
    return {
        "total_tokens": text + images_in + out,
        "input_tokens": text + images_in,
        "output_tokens": out,
        "input_tokens_details": {"text_tokens": text, "image_tokens": images_in},
        "output_tokens_details": {"image_tokens": out, "text_tokens": 0},
    }
