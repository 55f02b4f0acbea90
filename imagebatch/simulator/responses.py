"""Successful answers: rendered images as URLs or base64, revised prompts, token usage."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from . import usage as billing
from .edits import masked_edit
from .render import CONTENT_TYPES, render_image
from .request import Parsed
from .state import SimState


def revised_prompt(prompt: str, style: str | None) -> str:
    words = "vivid, dramatic" if style != "natural" else "natural, true-to-life"
    text = prompt.strip().rstrip(".!? ")
    return (
        f"A {words} image depicting {text[:1].lower() + text[1:]}, with a balanced composition, "
        f"carefully rendered lighting and rich detail throughout the scene."
    )


async def build_body(state: SimState, base_url: str, parsed: Parsed) -> dict[str, Any]:
    """The 200 body for a parsed request; URL images are stored in `state.files`."""
    spec = parsed.spec
    images = await _images(state, parsed)
    created = int(time.time())
    revised = (
        revised_prompt(parsed.prompt, parsed.style)
        if spec.revised_prompt and parsed.op == "generate"
        else None
    )
    data = _items(state, base_url, parsed, images, revised)
    body: dict[str, Any] = {"created": created, "data": data}
    if spec.is_gpt_image:
        body["background"] = parsed.background
        body["output_format"] = parsed.output_format
        body["size"] = f"{parsed.width}x{parsed.height}"
        if parsed.quality:
            body["quality"] = parsed.quality
    if spec.usage:
        body["usage"] = usage(parsed)
    return body


async def _images(state: SimState, parsed: Parsed) -> list[bytes]:
    """The encoded images: rendered, or for an edit, rendered into the source's masked area.
    Big renders and every edit run in a thread."""
    cfg = state.config
    spec = parsed.spec
    fmt = parsed.output_format
    transparent = parsed.background == "transparent"
    key = parsed.render_key
    cache = state.cache
    indices = state.image_indices(key, parsed.n)

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
            for i in indices
        ]

    def edit_all() -> list[bytes]:
        # An edit keeps the source outside the repaint area, as the real API does.
        source = parsed.inputs[0].data
        mask = parsed.mask.data if parsed.mask is not None else None
        alpha_is_mask = not spec.is_gpt_image  # dall-e-2: no mask, the image's transparency
        return [
            masked_edit(blob, source, mask, fmt, parsed.compression, transparent, alpha_is_mask)
            for blob in render_all()
        ]

    editing = parsed.op in ("edit", "edit_json") and bool(parsed.inputs)
    if editing:
        return await asyncio.to_thread(edit_all)
    if parsed.width * parsed.height * parsed.n <= 2_500_000:
        return render_all()
    return await asyncio.to_thread(render_all)


def _items(
    state: SimState, base_url: str, parsed: Parsed, images: list[bytes], revised: str | None
) -> list[dict[str, Any]]:
    """One `data` item per image: a URL to the simulator's file store, or base64."""
    cfg = state.config
    base = base_url.rstrip("/")
    now = time.monotonic()
    data: list[dict[str, Any]] = []
    for blob in images:
        item: dict[str, Any] = {}
        if parsed.response_format == "url":
            token = state.files.put(blob, CONTENT_TYPES[parsed.output_format], cfg.url_ttl, now)
            item["url"] = f"{base}/v1/_sim/files/{token}"
        else:
            item["b64_json"] = base64.b64encode(blob).decode("ascii")
        if revised is not None:
            item["revised_prompt"] = revised
        data.append(item)
    return data


def usage(parsed: Parsed) -> dict[str, Any]:
    """Token usage as GPT image models report it: prompt text, input images, output images."""
    free_sizes = parsed.spec.size_rule is not None
    return billing.usage(
        parsed.prompt or "",
        [(i.width, i.height) for i in parsed.inputs],
        parsed.quality or "medium",
        parsed.width,
        parsed.height,
        parsed.n,
        free_sizes,
    )
