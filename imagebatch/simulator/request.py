"""Reading a request: authentication, JSON and multipart bodies, typed fields, input images."""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import io
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from imagebatch.configs.registry import ModelSpec

from .failures import ApiFailure, bad, type_name

DATA_URL_MAX = 20_971_520


@dataclass
class InputImage:
    data: bytes
    format: str  # png / jpeg / webp / gif ...
    width: int
    height: int
    has_alpha: bool
    mode: str = "RGB"


@dataclass
class Parsed:
    op: str  # generate / edit / edit_json / variation
    model: str
    spec: ModelSpec
    prompt: str
    n: int
    width: int
    height: int
    quality: str | None  # resolved for echo and usage
    output_format: str
    compression: int | None
    background: str  # resolved: opaque / transparent
    response_format: str  # url / b64_json
    style: str | None
    inputs: list[InputImage] = field(default_factory=list)
    mask: InputImage | None = None

    @property
    def render_key(self) -> str:
        if self.op == "variation":
            return f"[variation] {hashlib.sha256(self.inputs[0].data).hexdigest()[:12]}"
        if self.op in ("edit", "edit_json"):
            return f"[edit] {self.prompt}"
        return self.prompt


# Declared types a file part may have (the real API refuses others: unsupported_file_mimetype).
FILE_MIMES = ("image/png", "image/jpeg", "image/webp")


class Params:
    """Typed access to request fields from JSON (typed) or multipart (all strings)."""

    def __init__(self, raw: dict[builtins.str, Any], form: bool) -> None:
        self.raw = raw
        self.form = form

    def has(self, name: builtins.str) -> bool:
        return name in self.raw

    def str(self, name: builtins.str) -> builtins.str | None:
        if name not in self.raw:
            return None
        value = self.raw[name]
        if not isinstance(value, str):
            raise bad(
                name,
                f"Invalid type for '{name}': expected a string, but got {type_name(value)} instead.",
                "invalid_type",
            )
        return value

    def int(self, name: builtins.str) -> int | None:
        if name not in self.raw:
            return None
        value = self.raw[name]
        if self.form and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        elif isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad(
            name,
            f"Invalid type for '{name}': expected an integer, but got {type_name(value)} instead.",
            "invalid_type",
        )

    def bool(self, name: builtins.str) -> bool | None:
        if name not in self.raw:
            return None
        value = self.raw[name]
        if isinstance(value, bool):
            return value
        if self.form and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad(
            name,
            f"Invalid type for '{name}': expected a boolean, but got {type_name(value)} instead.",
            "invalid_type",
        )

    def enum(
        self, name: builtins.str, allowed: tuple[builtins.str, ...] | list[builtins.str]
    ) -> builtins.str | None:
        value = self.str(name)
        if value is not None and value not in allowed:
            listed = ", ".join(f"'{a}'" for a in allowed)
            raise bad(name, f"Invalid value: '{value}'. Supported values are: {listed}.")
        return value


def inspect_image(data: bytes, param: str) -> InputImage:
    """Fully decoded, as the API does: a truncated file is not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
            mode = im.mode
            has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
            width, height = im.size
            im.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise bad(
            param,
            f"Invalid image file for '{param}': the data is not a readable image.",
            "invalid_image",
        ) from None
    return InputImage(data, "jpeg" if fmt == "jpg" else fmt, width, height, has_alpha, mode)


DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[^,;]*)*?);base64,(.*)$", re.S)


def decode_data_url(value: Any, param: str) -> bytes:
    if not isinstance(value, str):
        raise bad(
            param,
            f"Invalid type for '{param}': expected a string, but got {type_name(value)} instead.",
            "invalid_type",
        )
    if len(value) > DATA_URL_MAX:
        raise bad(
            param,
            f"Invalid '{param}': string too long. Expected a string with maximum length {DATA_URL_MAX}, but got a string with length {len(value)} instead.",
            "string_above_max_length",
        )
    m = DATA_URL.match(value)
    if not m:
        raise bad(
            param,
            f"Invalid '{param}': the simulator only accepts base64 data URLs (data:image/png;base64,...), not remote URLs.",
            "invalid_image_url",
        )
    try:
        return base64.b64decode(re.sub(r"\s+", "", m.group(3)), validate=True)
    except (binascii.Error, ValueError):
        raise bad(
            param, f"Invalid '{param}': the data URL is not valid base64.", "invalid_image_url"
        ) from None


def unsupported_ctype(ctype: str, accepted: str) -> ApiFailure:
    shown = ctype or "(none)"
    return bad(
        None,
        f"Unsupported content type: '{shown}'. This API method only accepts {accepted} requests, "
        f"but you specified the header 'Content-Type: {shown}'. Please try again with a supported content type.",
        "unsupported_content_type",
    )


async def json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise bad(
            None,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
            "valid JSON.)",
            None,
        )
    return {k: v for k, v in data.items() if v is not None}


async def form_body(request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    try:
        form = await request.form(max_files=64, max_fields=256, max_part_size=4 * 1024 * 1024)
    except Exception as exc:  # malformed multipart
        detail = getattr(exc, "detail", None) or str(exc)
        raise bad(None, f"Could not parse the multipart/form-data body: {detail}", None) from None
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in ("image", "image[]", "mask"):
                    raise bad(name, f"Unexpected file upload in field '{name}'.", "invalid_type")
                mime = (value.content_type or "").split(";")[0].strip().lower()
                if mime not in FILE_MIMES:
                    raise bad(
                        name.removesuffix("[]"),
                        f"Invalid file '{name.removesuffix('[]')}': unsupported mimetype ('{mime}'). "
                        "Supported file formats are 'image/jpeg', 'image/png', and 'image/webp'.",
                        "unsupported_file_mimetype",
                    )
                files.setdefault(name, []).append(await value.read())
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields, files


def image_ref(ref: Any, param: str) -> bytes:
    if not isinstance(ref, dict):
        raise bad(
            param,
            f"Invalid type for '{param}': expected an object, but got {type_name(ref)} instead.",
            "invalid_type",
        )
    extra = set(ref) - {"image_url", "file_id"}
    if extra:
        raise bad(
            f"{param}.{sorted(extra)[0]}",
            f"Unknown parameter: '{param}.{sorted(extra)[0]}'.",
            "unknown_parameter",
        )
    given = [k for k in ("image_url", "file_id") if ref.get(k) is not None]
    if len(given) != 1:
        raise bad(param, f"Invalid '{param}': give exactly one of 'image_url' or 'file_id'.")
    if given[0] == "file_id":
        raise bad(
            f"{param}.file_id",
            "The simulator has no Files API; send the image as an image_url data URL.",
        )
    return decode_data_url(ref["image_url"], f"{param}.image_url")


def check_auth(request: Request, expected: str | None, azure: bool = False) -> None:
    """401 unless the key comes in the header the path's API takes (OpenAI: Bearer; Azure's
    deployment paths: api-key) and, if one is configured, it matches."""
    key = None
    auth = request.headers.get("authorization")
    if azure:
        key = (request.headers.get("api-key") or "").strip() or None
        if key is None:
            raise ApiFailure(
                401,
                "Access denied due to missing subscription key. Make sure to include subscription "
                "key when making requests to an API.",
                None,
                None,
                "401",
            )
    elif auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            key = token.strip()
    if key is None:
        raise ApiFailure(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_request_error",
            None,
            "invalid_api_key",
        )
    if expected and not secrets.compare_digest(key.encode(), expected.encode()):
        masked = key[:3] + "*" * max(0, min(20, len(key) - 7)) + key[-4:] if len(key) > 7 else "***"
        raise ApiFailure(
            401,
            f"Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            "invalid_api_key",
        )
