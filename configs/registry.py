"""The model registry: per-model capabilities loaded from `models.toml`.

Code never names a model; it asks the registry. A user adds or overrides a model by
pointing `IMAGEBATCH_MODELS` (or `--models`) at a TOML file of the same shape; its
entries are merged over the bundled ones. A dated snapshot (`<model>-YYYY-MM-DD`) has its
base entry's rules under its own name, since providers pin snapshots faster than any
registry is edited.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from imagebatch.configs.errors import ConfigError

BUNDLED = Path(__file__).with_name("models.toml")
OPERATIONS = ("generate", "edit", "variation")
OPTIONAL_PARAMS = (
    "style",
    "response_format",
    "output_format",
    "output_compression",
    "background",
    "moderation",
    "input_fidelity",
    "user",
)
# The values each enumerated parameter takes; the validator and the simulator both check them.
CHOICES: dict[str, tuple[str, ...]] = {
    "style": ("vivid", "natural"),
    "background": ("transparent", "opaque", "auto"),
    "output_format": ("png", "jpeg", "webp"),
    "moderation": ("low", "auto"),
    "input_fidelity": ("high", "low"),
    "response_format": ("url", "b64_json"),
}
_SIZE_RE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")  # ASCII digits only
_SNAPSHOT_RE = re.compile(r"^(?P<base>.+)-(?P<date>\d{4}-\d{2}-\d{2})$")
# Optional parameters the multipart edit form has no field for (published schema); a model
# takes one there only when its entry lists it in `edit_params`.
NOT_ON_EDIT_FORM = frozenset({"moderation", "style"})


def parse_size(size: str) -> tuple[int, int] | None:
    """(width, height) of a `WxH` size as the API spells it ("1536x1024"), or None for
    anything else ("auto", "", "1536X1024 "). Validation lower-cases and strips sizes, so
    every stage after it parses with this one rule; a zero edge is returned for the caller
    to refuse (the registry says why, the others fall back)."""
    m = _SIZE_RE.fullmatch(size)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class SizeRule:
    multiple_of: int = 1
    max_ratio: float = 1e9
    max_edge: int = 1_000_000
    min_pixels: int = 0
    max_pixels: int = 10**12

    def check(self, width: int, height: int) -> str | None:
        """Why WxH breaks the rule, or None when it passes."""
        if width % self.multiple_of or height % self.multiple_of:
            return f"width and height must be multiples of {self.multiple_of}"
        if max(width, height) > self.max_edge:
            return f"longest edge must be at most {self.max_edge}"
        if max(width, height) / min(width, height) > self.max_ratio:
            return f"aspect ratio must be within {self.max_ratio:g}:1"
        pixels = width * height
        if pixels < self.min_pixels or pixels > self.max_pixels:
            return f"total pixels must be between {self.min_pixels:,} and {self.max_pixels:,}"
        return None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    endpoints: tuple[str, ...]
    max_n_per_call: int
    sizes: tuple[str, ...]
    edit_sizes: tuple[str, ...]
    qualities: tuple[str, ...]
    params: frozenset[str]
    response_format: str
    prompt_max: int
    retired: dt.date | None = None
    revised_prompt: bool = False
    usage: bool = False
    transparent_background: bool = False
    size_rule: SizeRule | None = None
    edit_images_max: int = 1
    edit_image_formats: tuple[str, ...] = ("png",)
    edit_image_max_bytes: int = 4_000_000
    edit_square_png: bool = False
    edit_image_modes: tuple[str, ...] = ()  # empty: no known restriction
    input_resize_to_size: bool = False
    mask_max_bytes: int = 4_000_000
    default_size: str = "1024x1024"
    default_quality: str = "auto"
    released: dt.date | None = None
    # Optional parameters the model takes on the edit form; None means `params` minus
    # NOT_ON_EDIT_FORM.
    edit_params: frozenset[str] | None = None
    # For a dated snapshot: the registry entry whose rules it has.
    base: str | None = None
    # False for a model the registry does not know (see `unchecked`): nothing above is true of it.
    checked: bool = True
    # May go through the Batch API (the published endpoint list names endpoints, not models;
    # a provider that refuses a model in batches sets this false).
    batch: bool = True

    @property
    def is_gpt_image(self) -> bool:
        """Base64-only models with output_format and usage; the DALL·E family answers with URLs."""
        return self.response_format == "b64_json"

    def params_for(self, operation: str) -> frozenset[str]:
        """Optional parameters the model takes on `operation` (edits use the multipart form)."""
        if operation == "generate":
            return self.params
        if self.edit_params is not None:
            return self.edit_params & self.params
        return self.params - NOT_ON_EDIT_FORM

    def allowed_sizes(self, operation: str) -> tuple[str, ...]:
        return self.sizes if operation == "generate" else self.edit_sizes

    def size_error(self, size: str, operation: str = "generate") -> str | None:
        """Why `size` is not allowed for this model and operation, or None."""
        allowed = self.allowed_sizes(operation)
        if size in allowed and size != "flexible":
            return None
        listed = ", ".join(s for s in allowed if s != "flexible")
        if "flexible" in allowed and self.size_rule is not None:
            parsed = parse_size(size)
            if parsed is None:
                return f"size must be 'auto' or WxH (for example 1536x1024), got {size!r}"
            w, h = parsed
            if w == 0 or h == 0:
                return "width and height must be positive"
            why = self.size_rule.check(w, h)
            return None if why is None else f"{size}: {why}"
        return f"{self.name} offers sizes {listed}; got {size!r}"

    def is_retired(self, on: dt.date | None = None) -> bool:
        return self.retired is not None and (on or dt.date.today()) >= self.retired


def _date(value: Any) -> dt.date | None:
    """TOML gives a date or a string; both are accepted."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value))


def _spec(name: str, raw: dict[str, Any]) -> ModelSpec:
    try:
        endpoints = tuple(raw["endpoints"])
        bad = [e for e in endpoints if e not in OPERATIONS]
        if bad:
            raise ConfigError(f"model {name}: unknown endpoints {bad}; use {list(OPERATIONS)}")
        unknown = set(raw.get("params", [])) - set(OPTIONAL_PARAMS)
        if unknown:
            raise ConfigError(f"model {name}: unknown params {sorted(unknown)}")
        rule = raw.get("size_rule")
        sizes = tuple(raw["sizes"])
        edit_params = raw.get("edit_params")
        if edit_params is not None and set(edit_params) - set(OPTIONAL_PARAMS):
            bad_edit = sorted(set(edit_params) - set(OPTIONAL_PARAMS))
            raise ConfigError(f"model {name}: unknown edit_params {bad_edit}")
        return ModelSpec(
            name=name,
            endpoints=endpoints,
            max_n_per_call=int(raw.get("max_n_per_call", 1)),
            sizes=sizes,
            edit_sizes=tuple(raw.get("edit_sizes", sizes)),
            qualities=tuple(raw.get("qualities", [])),
            params=frozenset(raw.get("params", [])),
            response_format=raw.get("response_format", "b64_json"),
            prompt_max=int(raw.get("prompt_max", 32000)),
            retired=_date(raw.get("retired")),
            revised_prompt=bool(raw.get("revised_prompt", False)),
            usage=bool(raw.get("usage", False)),
            transparent_background=bool(raw.get("transparent_background", False)),
            size_rule=SizeRule(**rule) if rule else None,
            edit_images_max=int(raw.get("edit_images_max", 1)),
            edit_image_formats=tuple(raw.get("edit_image_formats", ["png"])),
            edit_image_max_bytes=int(raw.get("edit_image_max_bytes", 4_000_000)),
            edit_square_png=bool(raw.get("edit_square_png", False)),
            edit_image_modes=tuple(raw.get("edit_image_modes", [])),
            input_resize_to_size=bool(raw.get("input_resize_to_size", False)),
            mask_max_bytes=int(raw.get("mask_max_bytes", 4_000_000)),
            default_size=raw.get("default_size", "1024x1024"),
            default_quality=raw.get("default_quality", "auto"),
            released=_date(raw.get("released")),
            edit_params=frozenset(edit_params) if edit_params is not None else None,
            batch=bool(raw.get("batch", True)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"model {name} in the registry is malformed: {exc!r}") from None


def unchecked(name: str) -> ModelSpec:
    """A stand-in for a model the registry does not know: every operation and parameter is
    let through for the server to judge, one image per call (the only count every model takes)."""
    return ModelSpec(
        name=name,
        endpoints=OPERATIONS,
        max_n_per_call=1,
        sizes=(),
        edit_sizes=(),
        qualities=(),
        params=frozenset(OPTIONAL_PARAMS),
        response_format="",
        prompt_max=0,
        edit_images_max=0,
        default_size="",
        default_quality="",
        checked=False,
    )


class Registry:
    def __init__(self, models: dict[str, ModelSpec]) -> None:
        self.models = models

    def get(self, name: str) -> ModelSpec | None:
        """The entry for `name`, or for a dated snapshot of an entry (named as asked)."""
        spec = self.models.get(name)
        if spec is not None:
            return spec
        match = _SNAPSHOT_RE.match(name)
        if match is None:
            return None
        base = self.models.get(match.group("base"))
        if base is None:
            return None
        try:
            dt.date.fromisoformat(match.group("date"))
        except ValueError:
            return None
        return replace(base, name=name, base=base.name)

    def newest(self, prefix: str) -> ModelSpec | None:
        """The most recently released model whose name starts with `prefix` (ties: by name)."""
        candidates = [
            m for m in self.models.values() if m.name.startswith(prefix) and m.released is not None
        ]
        if not candidates:
            return None
        return max(candidates, key=lambda m: (m.released, m.name))

    def names(self) -> list[str]:
        return sorted(self.models)

    @classmethod
    def load(cls, *extra: str | Path | None) -> Registry:
        """The bundled registry, overlaid by `IMAGEBATCH_MODELS` and then by `extra` files."""
        raw: dict[str, dict[str, Any]] = {}
        paths: list[Path] = [BUNDLED]
        env = os.environ.get("IMAGEBATCH_MODELS")
        if env:
            paths.append(Path(env))
        paths.extend(Path(p) for p in extra if p)
        for path in paths:
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ConfigError(f"model registry file not found: {path}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"model registry {path} is not valid TOML: {exc}") from None
            for name, spec in data.get("models", {}).items():
                raw[name] = {**raw.get(name, {}), **spec}
        return cls({name: _spec(name, spec) for name, spec in raw.items()})
