"""Successful answers: rendered images as URLs or base64, revised prompts, token usage."""

from __future__ import annotations

import asyncio
import base64
import math
import time
from typing import Any

from .render import CONTENT_TYPES, render_image
from .request import Parsed
from .state import SimState

OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160, "xhigh": 8320, "max": 16640}


def image_tokens(width: int, height: int) -> int:
    """Input image tokens, tile-based like OpenAI's vision pricing."""
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 65 + 129 * math.ceil(w / 512) * math.ceil(h / 512)


def revised_prompt(prompt: str, style: str | None) -> str:
    words = "vivid, dramatic" if style != "natural" else "natural, true-to-life"
    text = prompt.strip().rstrip(".!? ")
    return (
        f"A {words} image depicting {text[:1].lower() + text[1:]}, with a balanced composition, "
        f"carefully rendered lighting and rich detail throughout the scene."
    )


async def build_body(state: SimState, base_url: str, parsed: Parsed) -> dict[str, Any]:
    """The 200 body for a parsed request; URL images are stored in `state.files`."""
    cfg = state.config
    spec = parsed.spec
    fmt = parsed.output_format
    transparent = parsed.background == "transparent"
    key = parsed.render_key
    cache = state.cache

    def render_all() -> list[bytes]:
        return [
            render_image(
                key,
                i,
                (parsed.width, parsed.height),
                fmt,
                parsed.compression,
                transparent=transparent,
                text=cfg.render_text,
                cache=cache,
            )
            for i in range(parsed.n)
        ]

    images = (
        render_all()
        if parsed.width * parsed.height * parsed.n <= 2_500_000
        else await asyncio.to_thread(render_all)
    )
    created = int(time.time())
    data: list[dict[str, Any]] = []
    revised = (
        revised_prompt(parsed.prompt, parsed.style)
        if spec.revised_prompt and parsed.op == "generate"
        else None
    )
    base = base_url.rstrip("/")
    now = time.monotonic()
    for blob in images:
        item: dict[str, Any] = {}
        if parsed.response_format == "url":
            token = state.files.put(blob, CONTENT_TYPES[fmt], cfg.url_ttl, now)
            item["url"] = f"{base}/v1/_sim/files/{token}"
        else:
            item["b64_json"] = base64.b64encode(blob).decode("ascii")
        if revised is not None:
            item["revised_prompt"] = revised
        data.append(item)
    body: dict[str, Any] = {"created": created, "data": data}
    if spec.is_gpt_image:
        body["background"] = parsed.background
        body["output_format"] = fmt
        body["size"] = f"{parsed.width}x{parsed.height}"
        if parsed.quality:
            body["quality"] = parsed.quality
    if spec.usage:
        body["usage"] = usage(parsed)
    return body


def usage(parsed: Parsed) -> dict[str, Any]:
    """Token usage as GPT image models report it: prompt text, input images, output images."""
    text_tokens = max(1, math.ceil(len(parsed.prompt) / 4)) if parsed.prompt else 0
    image_in = sum(image_tokens(i.width, i.height) for i in parsed.inputs)
    per_image = OUTPUT_TOKENS.get(parsed.quality or "medium", OUTPUT_TOKENS["medium"])
    out = max(16, round(per_image * parsed.width * parsed.height / 1_048_576)) * parsed.n
    return {
        "total_tokens": text_tokens + image_in + out,
        "input_tokens": text_tokens + image_in,
        "output_tokens": out,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_in},
        "output_tokens_details": {"image_tokens": out, "text_tokens": 0},
    }
