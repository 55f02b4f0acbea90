"""The price book: per-model prices loaded from `prices.toml`, overlaid by the user's file.

Prices are data so they can be corrected the day the provider changes them. Amounts are
kept as `Decimal` (parsed from the TOML text of each number), so a cap of $1.00 holds
exactly fifty $0.02 images instead of forty-nine after float rounding.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from imagebatch.configs.errors import ConfigError
from imagebatch.configs.registry import parse_size
from imagebatch.configs.tables import merge_tables

BUNDLED = Path(__file__).with_name("prices.toml")
RATE_KEYS = (
    "text_input",
    "text_cached_input",
    "image_input",
    "image_cached_input",
    "image_output",
    "text_output",
)
MODEL_KEYS = {
    "checked",
    "source",
    "same_as",
    "batch_discount",
    "per_image",
    "output_tokens",
    "output_rule",
    "auto_sizes",
    "auto_qualities",
    *RATE_KEYS,
}
_SNAPSHOT = re.compile(r"^(.+)-\d{4}-\d{2}-\d{2}$")
MILLION = Decimal(1_000_000)


def usd(value: Any) -> Decimal:
    """A TOML number as an exact Decimal (0.016 stays 0.016, not 0.01600000000000000033)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    amount = Decimal(str(value))
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"not a non-negative amount: {value!r}")
    return amount


@dataclass(frozen=True)
class OutputRule:
    """Output tokens for any WxH, from per-quality factors (gpt-image-2's free sizes)."""

    quality_factors: dict[str, int]
    area_offset: int
    area_scale: int

    def tokens(self, quality: str, width: int, height: int) -> int | None:
        factor = self.quality_factors.get(quality)
        if factor is None or width <= 0 or height <= 0:
            return None
        long_edge, short_edge = max(width, height), min(width, height)
        # round(factor * short / long), halves rounding up, in integers
        short = (2 * factor * short_edge + long_edge) // (2 * long_edge)
        return -(-factor * short * (width * height + self.area_offset) // self.area_scale)


@dataclass(frozen=True)
class ModelPrices:
    model: str
    checked: str = ""
    source: str = ""
    batch_discount: Decimal = Decimal(1)
    per_image: dict[str, Decimal] = field(default_factory=dict)
    rates: dict[str, Decimal] = field(default_factory=dict)  # USD per 1M tokens
    output_tokens: dict[str, int] = field(default_factory=dict)
    output_rule: OutputRule | None = None
    auto_sizes: tuple[str, ...] = ()
    auto_qualities: tuple[str, ...] = ()

    def image_price(self, quality: str, size: str) -> Decimal | None:
        return self.per_image.get(f"{quality}/{size}")

    def tokens_out(self, quality: str, size: str) -> int | None:
        """Output tokens of one image at this quality and size, or None when not published."""
        listed = self.output_tokens.get(f"{quality}/{size}")
        if listed is not None or self.output_rule is None:
            return listed
        parsed = parse_size(size)
        return None if parsed is None else self.output_rule.tokens(quality, *parsed)

    def rate(self, name: str) -> Decimal | None:
        """USD per token, or None when the rate is not known."""
        per_million = self.rates.get(name)
        return None if per_million is None else per_million / MILLION


@dataclass(frozen=True)
class EstimateRules:
    text_bytes_per_token: int = 4
    image_tile: int = 512
    image_fit_edge: int = 2048
    image_short_edge: int = 768
    image_base_tokens: int = 65
    image_tile_tokens: int = 129

    def text_tokens(self, prompt: str, worst: bool = False) -> int:
        size = len(prompt.encode("utf-8"))
        return size if worst else math.ceil(size / self.text_bytes_per_token)

    def image_tokens(self, width: int, height: int) -> int:
        """Input tokens of one source image by the tile rule."""
        scale = min(1.0, self.image_fit_edge / max(width, height, 1))
        w, h = width * scale, height * scale
        scale = min(1.0, self.image_short_edge / max(min(w, h), 1))
        w, h = w * scale, h * scale
        tiles = math.ceil(w / self.image_tile) * math.ceil(h / self.image_tile)
        return self.image_base_tokens + self.image_tile_tokens * tiles


class PriceBook:
    def __init__(self, models: dict[str, ModelPrices], rules: EstimateRules) -> None:
        self.models = models
        self.rules = rules

    def get(self, model: str) -> ModelPrices | None:
        """The model's prices; a dated snapshot falls back to its base model."""
        found = self.models.get(model)
        if found is None and (m := _SNAPSHOT.match(model)):
            found = self.models.get(m.group(1))
        return found

    @classmethod
    def load(cls, *extra: str | Path | None) -> PriceBook:
        """The bundled prices, overlaid by `IMAGEBATCH_PRICES` and then by `extra` files."""
        paths: list[Path] = [BUNDLED]
        env = os.environ.get("IMAGEBATCH_PRICES")
        if env:
            paths.append(Path(env))
        paths.extend(Path(p) for p in extra if p)
        raw: dict[str, dict[str, Any]] = {}
        estimate: dict[str, Any] = {}
        for path in paths:
            data = _read(path)
            estimate.update(data.get("estimate", {}))
            for name, entry in data.get("prices", {}).items():
                raw[name] = merge_tables(raw.get(name, {}), entry)
        try:
            rules = EstimateRules(**estimate)
        except TypeError as exc:
            raise ConfigError(f"bad [estimate] in the prices: {exc}") from None
        return cls({name: _model(name, _resolve(name, raw)) for name in raw}, rules)


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"prices file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"prices file {path} is not valid TOML: {exc}") from None


def _resolve(name: str, raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Follow `same_as` links (own keys win), refusing loops and unknown targets."""
    entry, seen = raw[name], [name]
    while "same_as" in entry:
        target = entry["same_as"]
        if target in seen or target not in raw:
            why = "loops" if target in seen else "names a model with no prices"
            raise ConfigError(f"prices for {name}: same_as {target!r} {why}")
        seen.append(target)
        rest = {k: v for k, v in entry.items() if k != "same_as"}
        entry = merge_tables(raw[target], rest)
    return entry


def _model(name: str, raw: dict[str, Any]) -> ModelPrices:
    unknown = set(raw) - MODEL_KEYS
    if unknown:
        raise ConfigError(f"prices for {name}: unknown keys {sorted(unknown)}")
    try:
        rule = raw.get("output_rule")
        return ModelPrices(
            model=name,
            checked=str(raw.get("checked", "")),
            source=str(raw.get("source", "")),
            batch_discount=usd(raw.get("batch_discount", 1)),
            per_image={k: usd(v) for k, v in raw.get("per_image", {}).items()},
            rates={k: usd(raw[k]) for k in RATE_KEYS if k in raw},
            output_tokens={k: int(v) for k, v in raw.get("output_tokens", {}).items()},
            output_rule=OutputRule(
                quality_factors={k: int(v) for k, v in rule["quality_factors"].items()},
                area_offset=int(rule["area_offset"]),
                area_scale=int(rule["area_scale"]),
            )
            if rule
            else None,
            auto_sizes=tuple(raw.get("auto_sizes", ())),
            auto_qualities=tuple(raw.get("auto_qualities", ())),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"prices for {name} are malformed: {exc!r}") from None
