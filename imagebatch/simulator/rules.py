"""The request rules: which parameters each model and operation take, their values, sizes, inputs.

Per-model rules come from the model registry (`configs/models.toml`), never from this file.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from starlette.requests import Request

from imagebatch.configs.registry import (
    CHOICES,
    OPTIONAL_PARAMS,
    ModelSpec,
    Registry,
    parse_size,
)

from .failures import ApiFailure, bad, type_name, unknown_param
from .request import (
    InputImage,
    Params,
    Parsed,
    form_body,
    image_ref,
    inspect_image,
    json_body,
    unsupported_ctype,
)

DEFAULT_MODEL = {
    "generate": "dall-e-2",
    "edit": "gpt-image-1.5",
    "edit_json": "gpt-image-1.5",
    "variation": "dall-e-2",
}
ENDPOINT_OF = {
    "generate": "generate",
    "edit": "edit",
    "edit_json": "edit",
    "variation": "variation",
}
LABEL = {"generate": "generations", "edit": "edits", "variation": "variations"}
# parameters every model takes on an operation (GPT_ONLY ones need a GPT image model)
CORE = {
    "generate": {"prompt", "model", "n", "size", "quality"},
    "edit": {"image", "image[]", "mask", "prompt", "model", "n", "size", "quality"},
    "edit_json": {"images", "mask", "prompt", "model", "n", "size", "quality"},
    "variation": {"image", "image[]", "model", "n", "size"},
}
GPT_ONLY = {"stream", "partial_images"}
UNIVERSAL = {"safety_identifier"}
# registry-governed optional parameters that make sense per operation
OPTIONAL = {
    "generate": set(OPTIONAL_PARAMS) - {"input_fidelity"},
    "edit": set(OPTIONAL_PARAMS) - {"style"},
    "edit_json": set(OPTIONAL_PARAMS) - {"style", "response_format"},
    "variation": {"response_format", "user"},
}
GPT_IMAGE_PREFIX = "gpt-image-"
JSON_EDIT_SIZES = ("auto", "1024x1024", "1536x1024", "1024x1536")


def newest_family(registry: Registry, model: str) -> ModelSpec | None:
    """An unknown `gpt-image-*` name is served with the newest GPT image model's rules, as a
    provider serves a model the registry has not caught up with."""
    if not model.startswith(GPT_IMAGE_PREFIX):
        return None
    newest = registry.newest(GPT_IMAGE_PREFIX)
    return None if newest is None else replace(newest, name=model, base=newest.name)


def edit_auto_size(first: InputImage | None) -> tuple[int, int]:
    if first is None:
        return 1024, 1024
    ratio = first.width / max(1, first.height)
    if ratio > 1.2:
        return 1536, 1024
    if ratio < 1 / 1.2:
        return 1024, 1536
    return 1024, 1024


async def parse_request(
    request: Request,
    operation: str,
    default_model: str | None,
    registry: Registry,
    refuse_retired: bool,
) -> Parsed:
    """The request as a `Parsed`, or an ApiFailure naming the first rule it breaks."""
    raw, files, form, op = await _read_body(request, operation)
    p = Params(raw, form)
    model = p.str("model") or default_model or DEFAULT_MODEL[op]
    spec = _model_spec(registry, model, op, refuse_retired)
    _check_names(p, files, op, spec, model)
    prompt = _prompt(p, op, spec)
    n = _count(p, spec)
    quality = _quality(p, spec)
    style, response_format, output_format, compression, background = _output_options(p, spec, model)
    inputs, mask = _input_images(raw, files, op)
    if op != "generate":
        check_inputs(op, spec, model, inputs, mask)
    width, height = _size(p, op, spec, inputs)
    return Parsed(
        op,
        model,
        spec,
        prompt,
        n,
        width,
        height,
        quality,
        output_format if spec.is_gpt_image else "png",
        compression,
        background,
        response_format,
        style,
        inputs,
        mask,
    )


async def _read_body(
    request: Request, operation: str
) -> tuple[dict[str, Any], dict[str, list[bytes]], bool, str]:
    """(fields, files, whether multipart, op): generations take JSON, edits JSON or
    multipart (JSON edits are their own op), variations multipart."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if operation == "generate":
        if ctype != "application/json":
            raise unsupported_ctype(ctype, "'application/json'")
        return await json_body(request), {}, False, "generate"
    if operation == "edit" and ctype == "application/json":
        return await json_body(request), {}, False, "edit_json"
    if ctype == "multipart/form-data":
        raw, files = await form_body(request)
        return raw, files, True, operation
    accepted = (
        "'multipart/form-data' or 'application/json'"
        if operation == "edit"
        else "'multipart/form-data'"
    )
    raise unsupported_ctype(ctype, accepted)


def _model_spec(registry: Registry, model: str, op: str, refuse_retired: bool) -> ModelSpec:
    """404 for unknown (or, when configured, retired) models; 400 if the model lacks the endpoint."""
    spec = registry.get(model) or newest_family(registry, model)
    if spec is None or (refuse_retired and spec.is_retired()):
        why = (
            "has been deprecated"
            if spec is not None
            else "does not exist or you do not have access to it"
        )
        raise ApiFailure(
            404, f"The model `{model}` {why}.", "invalid_request_error", None, "model_not_found"
        )
    endpoint = ENDPOINT_OF[op]
    if endpoint not in spec.endpoints:
        raise bad(
            "model",
            f"The model '{model}' does not support image {LABEL[endpoint]}. "
            f"It serves: {', '.join(spec.endpoints)}.",
        )
    if op == "edit_json" and not spec.is_gpt_image:
        raise bad(
            "model",
            f"JSON image edits are only supported for GPT image models; send {model} edits as multipart/form-data.",
        )
    return spec


def _check_names(
    p: Params, files: dict[str, list[bytes]], op: str, spec: ModelSpec, model: str
) -> None:
    """Every parameter is one the model takes on this operation, with the right kind of value."""
    raw = p.raw
    for name in list(raw) + list(files):
        if name in CORE[op] or name in UNIVERSAL:
            continue
        if name in GPT_ONLY and spec.is_gpt_image and op != "variation":
            continue
        if name in OPTIONAL[op] and name in (
            spec.params_for("edit") if op == "edit" else spec.params
        ):
            continue
        raise unknown_param(name, model)
    for name in ("image", "image[]", "mask") if p.form else ():
        if name in raw:
            raise bad(
                name,
                f"Invalid type for '{name}': expected a file, but got a string instead.",
                "invalid_type",
            )
    if "quality" in raw and not spec.qualities:
        raise unknown_param("quality", model)
    if p.bool("stream"):
        raise bad(
            "stream",
            "Streaming is not implemented by the imagebatch simulator; send stream=false.",
            "unsupported_value",
        )
    partial = p.int("partial_images")
    if partial is not None and not 0 <= partial <= 3:
        raise bad(
            "partial_images",
            f"Invalid 'partial_images': expected a value between 0 and 3, but got {partial} instead.",
        )
    for name in ("user", "safety_identifier"):
        p.str(name)


def _prompt(p: Params, op: str, spec: ModelSpec) -> str:
    if op == "variation":
        return ""
    value = p.str("prompt")
    if value is None:
        raise bad("prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter")
    if not value.strip():
        raise bad(
            "prompt",
            "Invalid 'prompt': empty string. Expected a string with minimum length 1.",
            "string_below_min_length",
        )
    if len(value) > spec.prompt_max:
        raise bad(
            "prompt",
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{spec.prompt_max}, but got a string with length {len(value)} instead.",
            "string_above_max_length",
        )
    return value


def _count(p: Params, spec: ModelSpec) -> int:
    n = p.int("n")
    n = 1 if n is None else n
    if n < 1:
        raise bad(
            "n",
            f"Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} instead.",
            "integer_below_min_value",
        )
    top = min(10, spec.max_n_per_call)
    if n > top:
        raise bad(
            "n",
            f"Invalid 'n': integer above maximum value. Expected a value <= {top}, but got {n} instead.",
            "integer_above_max_value",
        )
    return n


def _quality(p: Params, spec: ModelSpec) -> str | None:
    """The quality to echo and bill: the sent one, else the model's default; auto means medium."""
    quality = p.enum("quality", spec.qualities) if spec.qualities else None
    if quality is None and spec.qualities:
        quality = (
            spec.default_quality if spec.default_quality in spec.qualities else spec.qualities[0]
        )
    if quality == "auto":
        quality = "medium"
    return quality


def _output_options(
    p: Params, spec: ModelSpec, model: str
) -> tuple[str | None, str, str, int | None, str]:
    """(style, response_format, output_format, compression, background), checked together.
    Only parameters the model accepts got this far."""
    style = p.enum("style", CHOICES["style"])
    if spec.is_gpt_image:
        response_format = "b64_json"
    else:
        response_format = p.enum("response_format", CHOICES["response_format"]) or "url"
    output_format = p.enum("output_format", CHOICES["output_format"]) or "png"
    compression = p.int("output_compression")
    if compression is not None:
        if not 0 <= compression <= 100:
            raise bad(
                "output_compression",
                f"Invalid 'output_compression': expected a value between 0 and 100, but got {compression} instead.",
            )
        if output_format == "png":
            raise bad(
                "output_compression",
                "The 'output_compression' parameter is only supported for the 'jpeg' and 'webp' output formats.",
            )
    background = p.enum("background", CHOICES["background"]) or "auto"
    if background == "transparent":
        if output_format == "jpeg":
            raise bad(
                "background",
                "Transparent background requires output_format 'png' or 'webp', not 'jpeg'.",
            )
        if not spec.transparent_background:
            raise bad(
                "background",
                f"Transparent background is not supported for {model}.",
                "unsupported_value",
            )
    background = "transparent" if background == "transparent" else "opaque"
    p.enum("moderation", CHOICES["moderation"])
    p.enum("input_fidelity", CHOICES["input_fidelity"])
    return style, response_format, output_format, compression, background


def _input_images(
    raw: dict[str, Any], files: dict[str, list[bytes]], op: str
) -> tuple[list[InputImage], InputImage | None]:
    """Source images and mask: multipart files, or data URLs in a JSON edit."""
    if op in ("edit", "variation"):
        blobs = files.get("image", []) + files.get("image[]", [])
        inputs = [inspect_image(b, "image") for b in blobs]
        masks = files.get("mask", [])
        if len(masks) > 1:
            raise bad("mask", "Only one mask may be sent.")
        return inputs, inspect_image(masks[0], "mask") if masks else None
    if op != "edit_json":
        return [], None
    refs = raw.get("images")
    if refs is None:
        raise bad("images", "Missing required parameter: 'images'.", "missing_required_parameter")
    if not isinstance(refs, list):
        raise bad(
            "images",
            f"Invalid type for 'images': expected an array, but got {type_name(refs)} instead.",
            "invalid_type",
        )
    inputs = [
        inspect_image(image_ref(ref, f"images[{i}]"), f"images[{i}]") for i, ref in enumerate(refs)
    ]
    mask = inspect_image(image_ref(raw["mask"], "mask"), "mask") if "mask" in raw else None
    return inputs, mask


def _size(p: Params, op: str, spec: ModelSpec, inputs: list[InputImage]) -> tuple[int, int]:
    """Width and height. SPEC: JSON edits default to auto, everything else to the model's default size."""
    size = p.str("size")
    if size is None:
        edit_auto = op == "edit_json" and "auto" in spec.allowed_sizes("edit")
        size = "auto" if edit_auto else spec.default_size
    if op == "edit_json" and size not in JSON_EDIT_SIZES:
        raise bad(
            "size",
            f"Invalid value: '{size}'. Supported values are: {', '.join(repr(s) for s in JSON_EDIT_SIZES)}.",
        )
    size_why = spec.size_error(size, "generate" if op == "generate" else "edit")
    if size_why:
        raise bad("size", f"Invalid value for 'size': {size_why}.")
    parsed = parse_size(size)
    if parsed is not None:
        return parsed
    if op in ("edit", "edit_json"):
        return edit_auto_size(inputs[0] if inputs else None)
    return 1024, 1024


def check_inputs(
    op: str, spec: ModelSpec, model: str, inputs: list[InputImage], mask: InputImage | None
) -> None:
    param = "images" if op == "edit_json" else "image"
    if not inputs:
        raise bad(param, f"Missing required parameter: '{param}'.", "missing_required_parameter")
    limit = 1 if op == "variation" else spec.edit_images_max
    if len(inputs) > limit:
        raise bad(
            param,
            f"Invalid '{param}': {model} accepts at most {limit} input image(s), got {len(inputs)}.",
        )
    square_png = op == "variation" or spec.edit_square_png
    allowed = (
        ("png",)
        if square_png
        else tuple("jpeg" if f == "jpg" else f for f in spec.edit_image_formats)
    )
    for img in inputs:
        # The API's limits are "< 4 MB", "< 50 MB": a file of exactly the limit is refused.
        if len(img.data) >= spec.edit_image_max_bytes:
            raise bad(
                param,
                f"Invalid '{param}': image is {len(img.data):,} bytes; {model} accepts images "
                f"under {spec.edit_image_max_bytes:,} bytes.",
                "image_too_large",
            )
        if img.format not in allowed:
            raise bad(
                param,
                f"Invalid image format '{img.format}' for '{param}'. Supported formats: {', '.join(allowed)}.",
                "invalid_image_format",
            )
        if square_png and img.width != img.height:
            raise bad(
                param,
                f"Invalid '{param}': {model} needs a square PNG, got {img.width}x{img.height}.",
                "invalid_image",
            )
        if op != "variation" and spec.edit_image_modes and img.mode not in spec.edit_image_modes:
            modes = ", ".join(f"'{m}'" for m in spec.edit_image_modes)
            raise bad(
                param,
                f"Invalid input image - format must be in [{modes}], got {img.mode}.",
                "invalid_image",
            )
    if mask is not None:
        _check_mask(spec, mask, inputs[0])


def _check_mask(spec: ModelSpec, mask: InputImage, first: InputImage) -> None:
    if len(mask.data) >= spec.mask_max_bytes:
        raise bad(
            "mask",
            f"Invalid 'mask': {len(mask.data):,} bytes; it must be under {spec.mask_max_bytes:,}.",
            "image_too_large",
        )
    if mask.format != "png":
        raise bad(
            "mask",
            f"Invalid 'mask': must be a PNG, got '{mask.format}'.",
            "invalid_image_format",
        )
    if not mask.has_alpha:
        raise bad(
            "mask",
            "Invalid 'mask': the mask PNG must have an alpha channel.",
            "invalid_image",
        )
    if (mask.width, mask.height) != (first.width, first.height):
        raise bad(
            "mask",
            f"Invalid 'mask': mask is {mask.width}x{mask.height} but the image is "
            f"{first.width}x{first.height}; they must have the same dimensions.",
            "invalid_image",
        )
