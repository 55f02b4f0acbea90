"""Cost: what a request unit should cost before it is sent, and what a call did cost after.

Estimates come from the price book (`configs/prices.toml`): DALL·E by the image, GPT image
models by the token (output tokens per size and quality, input tokens from the prompt and
the source images). Each estimate has a worst case, which the cost cap reserves: `auto`
sizes and qualities at their dearest, the prompt at one token per byte. Actual cost comes
from the response's `usage`, priced at the token rates and split evenly over the images of
the call. Anything without a price is `None` (unknown), never zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from imagebatch.configs.prices import ModelPrices, PriceBook
from imagebatch.tasks.plan import RequestUnit
from imagebatch.tasks.validate import ValidJob

ZERO = Decimal(0)


@dataclass(frozen=True)
class Estimate:
    """One request unit: expected cost, the worst case the cap reserves, and how it was got."""

    usd: Decimal | None
    worst_usd: Decimal | None
    basis: str


@dataclass(frozen=True)
class CallCost:
    """One answered call: the usage as integers (None when not reported) and its price."""

    usd: Decimal | None
    images: int
    text_tokens: int | None = None
    image_tokens: int | None = None
    output_tokens: int | None = None

    def share(self) -> Decimal | None:
        """Each image's part of the call's cost."""
        return None if self.usd is None or not self.images else self.usd / self.images


def _size_quality(job: ValidJob) -> tuple[str, str]:
    spec = job.model
    return (
        str(job.params.get("size") or spec.default_size),
        str(job.params.get("quality") or spec.default_quality),
    )


def _choices(value: str, auto: tuple[str, ...]) -> tuple[str, ...]:
    """What an `auto` value may become (first: the estimate); other values stand for themselves."""
    return auto if value == "auto" and auto else (value,)


def _max(values: Iterable[Decimal | None]) -> Decimal | None:
    found = list(values)
    return (
        None
        if not found or any(v is None for v in found)
        else max(v for v in found if v is not None)
    )


def _fmt(amount: Decimal) -> str:
    return f"${amount.normalize():f}" if amount >= Decimal("0.01") else f"${amount:.6f}"


def _output_cost(prices: ModelPrices, quality: str, size: str) -> Decimal | None:
    """Output cost of one image: output tokens at the output rate, else the published price."""
    tokens, rate = prices.tokens_out(quality, size), prices.rate("image_output")
    if tokens is not None and rate is not None:
        return tokens * rate
    return prices.image_price(quality, size)


def estimate_unit(book: PriceBook, job: ValidJob, n: int, *, batch: bool = False) -> Estimate:
    """Expected and worst-case cost of one call asking `job` for `n` images."""
    prices = book.get(job.model.name)
    if prices is None:
        return Estimate(None, None, f"no prices for {job.model.name}")
    size, quality = _size_quality(job)
    combos = [
        (q, s)
        for q in _choices(quality, prices.auto_qualities)
        for s in _choices(size, prices.auto_sizes)
    ]
    if job.model.usage:
        per_image = [_output_cost(prices, q, s) for q, s in combos]
        inputs, worst_inputs, basis = _input_costs(book, prices, job)
    else:
        per_image = [prices.image_price(q, s) for q, s in combos]
        inputs, worst_inputs, basis = ZERO, ZERO, ""
    first, worst = per_image[0], _max(per_image)
    factor = prices.batch_discount if batch else Decimal(1)
    usd = None if first is None or inputs is None else (first * n + inputs) * factor
    worst_usd = (
        None if worst is None or worst_inputs is None else (worst * n + worst_inputs) * factor
    )
    basis = _basis(prices, job, quality, size, first) + (basis if first is not None else "")
    return Estimate(usd, worst_usd, basis)


def _input_costs(
    book: PriceBook, prices: ModelPrices, job: ValidJob
) -> tuple[Decimal | None, Decimal | None, str]:
    """Text and source-image input cost of one call: expected, worst case, and a note."""
    prompt = str(job.params.get("prompt") or "")
    rules = book.rules
    text, text_worst = rules.text_tokens(prompt), rules.text_tokens(prompt, worst=True)
    sources = [*job.images, *([job.mask] if job.mask else [])]
    image = sum(rules.image_tokens(s.width, s.height) for s in sources)
    text_rate, image_rate = prices.rate("text_input"), prices.rate("image_input")
    if (text_worst and text_rate is None) or (image and image_rate is None):
        missing = "text" if text_worst and text_rate is None else "image"
        return None, None, f"; no {missing} input rate for {job.model.name}"
    text_cost = text * text_rate if text_rate is not None else ZERO
    text_worst_cost = text_worst * text_rate if text_rate is not None else ZERO
    image_cost = image * image_rate if image_rate is not None else ZERO
    note = f" + ~{text + image} input tokens"
    return text_cost + image_cost, text_worst_cost + image_cost, note


def _basis(
    prices: ModelPrices, job: ValidJob, quality: str, size: str, first: Decimal | None
) -> str:
    q = _choices(quality, prices.auto_qualities)[0]
    s = _choices(size, prices.auto_sizes)[0]
    assumed = [
        f"{what} auto as {v}"
        for what, a, v in (("quality", quality, q), ("size", size, s))
        if a != v
    ]
    shown = f" ({', '.join(assumed)})" if assumed else ""
    if first is None:
        return f"no price for {job.model.name} {q} {s}".rstrip()
    tokens, rate = prices.tokens_out(q, s), prices.rates.get("image_output")
    if job.model.usage and tokens is not None and rate is not None:
        return f"{tokens} output tokens/image{shown} at ${rate.normalize():f}/1M"
    return f"{_fmt(first)}/image{shown}"


def _count(value: Any) -> int | None:
    """A token count from a server: a non-negative integer, or None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def price_call(
    book: PriceBook,
    job: ValidJob,
    images: int,
    usage: dict[str, Any] | None,
    *,
    batch: bool = False,
) -> CallCost:
    """The cost of one answered call that returned `images` images (a Batch API line: at
    the model's batch discount).

    GPT image models: `usage` at the token rates (a call without usage is unknown). DALL·E:
    the per-image price of the size and quality asked for.
    """
    cost = _price_call(book, job, images, usage)
    prices = book.get(job.model.name)
    if batch and cost.usd is not None and prices is not None:
        return replace(cost, usd=cost.usd * prices.batch_discount)
    return cost


def cost_fields(call: CallCost, est: Estimate, n: int) -> dict[str, Any]:
    """Journal fields of each image of a call: the call's usage as integers, the image's
    share of its cost, and its share of the estimate made before sending."""
    share = call.share()
    return {
        "call_images": call.images,
        "call_text_tokens": call.text_tokens,
        "call_image_tokens": call.image_tokens,
        "call_output_tokens": call.output_tokens,
        "cost_usd": None if share is None else float(share),
        "estimated_usd": None if est.usd is None else float(est.usd / n),
    }


def _price_call(
    book: PriceBook, job: ValidJob, images: int, usage: dict[str, Any] | None
) -> CallCost:
    prices = book.get(job.model.name)
    if not job.model.usage:
        size, quality = _size_quality(job)
        each = prices.image_price(quality, size) if prices else None
        return CallCost(None if each is None else each * images, images)
    if not isinstance(usage, dict):
        return CallCost(None, images)
    details = usage.get("input_tokens_details")
    details = details if isinstance(details, dict) else {}
    out_details = usage.get("output_tokens_details")
    out_details = out_details if isinstance(out_details, dict) else {}
    total_in, total_out = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    text, image = _count(details.get("text_tokens")), _count(details.get("image_tokens"))
    out_text = _count(out_details.get("text_tokens")) or 0
    cost = CallCost(None, images, text, image, total_out)
    if prices is None or total_out is None:
        return cost
    if text is None or image is None:
        # No split reported: every input token at the dearer input rate, never less.
        if total_in is None:
            return cost
        parts = [(total_in, _dearest(prices, "text_input", "image_input"))]
    else:
        parts = [(text, prices.rate("text_input")), (image, prices.rate("image_input"))]
    image_out = total_out - min(out_text, total_out)
    parts += [
        (image_out, prices.rate("image_output")),
        (total_out - image_out, prices.rate("text_output") or prices.rate("image_output")),
    ]
    if any(tokens and rate is None for tokens, rate in parts):
        return cost
    usd = sum((tokens * rate for tokens, rate in parts if tokens and rate is not None), ZERO)
    return CallCost(usd, images, text, image, total_out)


def _dearest(prices: ModelPrices, *names: str) -> Decimal | None:
    rates = [prices.rate(n) for n in names]
    return None if any(r is None for r in rates) else max(r for r in rates if r is not None)


@dataclass
class PlanLine:
    """Requests of one model, operation, size and quality, with their estimated cost."""

    model: str
    operation: str
    size: str
    quality: str
    jobs: set[str] = field(default_factory=set)
    requests: int = 0
    images: int = 0
    usd: Decimal | None = ZERO
    worst_usd: Decimal | None = ZERO
    basis: str = ""


@dataclass
class CostPlan:
    lines: list[PlanLine]

    @property
    def jobs(self) -> int:
        return len({j for line in self.lines for j in line.jobs})

    @property
    def requests(self) -> int:
        return sum(line.requests for line in self.lines)

    @property
    def images(self) -> int:
        return sum(line.images for line in self.lines)

    @property
    def usd(self) -> Decimal:
        """The estimate of everything priced; see `unknown_images` for the rest."""
        return sum((line.usd for line in self.lines if line.usd is not None), ZERO)

    @property
    def worst_usd(self) -> Decimal:
        return sum((line.worst_usd for line in self.lines if line.worst_usd is not None), ZERO)

    @property
    def unknown_images(self) -> int:
        return sum(line.images for line in self.lines if line.usd is None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (run.json): amounts as floats, unknown as null."""
        return {
            "jobs": self.jobs,
            "requests": self.requests,
            "images": self.images,
            "estimate_usd": float(self.usd),
            "worst_case_usd": float(self.worst_usd),
            "unknown_images": self.unknown_images,
            "lines": [
                {
                    "model": line.model,
                    "operation": line.operation,
                    "size": line.size,
                    "quality": line.quality,
                    "jobs": len(line.jobs),
                    "requests": line.requests,
                    "images": line.images,
                    "estimate_usd": None if line.usd is None else float(line.usd),
                    "worst_case_usd": None if line.worst_usd is None else float(line.worst_usd),
                    "basis": line.basis,
                }
                for line in self.lines
            ],
        }


def cost_plan(
    book: PriceBook,
    units: Iterable[RequestUnit],
    *,
    batch: Callable[[RequestUnit], bool] | None = None,
) -> CostPlan:
    """Group request units by model, operation, size and quality and add up their estimates.

    `batch` says which units go through the Batch API (priced with the batch discount)."""
    lines: dict[tuple[str, str, str, str], PlanLine] = {}
    for unit in units:
        job = unit.planned.job
        size, quality = _size_quality(job)
        quality = quality if "quality" in job.params else ""
        key = (job.model.name, job.operation, size, quality)
        line = lines.setdefault(key, PlanLine(*key))
        est = estimate_unit(book, job, unit.n, batch=batch is not None and batch(unit))
        line.jobs.add(unit.planned.job_id)
        line.requests += 1
        line.images += unit.n
        line.usd = None if line.usd is None or est.usd is None else line.usd + est.usd
        line.worst_usd = (
            None
            if line.worst_usd is None or est.worst_usd is None
            else line.worst_usd + est.worst_usd
        )
        line.basis = line.basis or est.basis
    return CostPlan(list(lines.values()))
