"""Prices as data, estimates per model/operation/size/quality, and actual cost from `usage`."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from imagebatch.configs.prices import PriceBook
from imagebatch.configs.registry import Registry
from imagebatch.configs.settings import JobDefaults
from imagebatch.tasks.cost import cost_plan, estimate_unit, price_call
from imagebatch.tasks.errors import ConfigError
from imagebatch.tasks.plan import plan_jobs, units_for
from imagebatch.tasks.read_jobs import read_jobs
from imagebatch.tasks.validate import Validator, ValidJob

D = Decimal
M = D(1_000_000)


def valid(rows: list[dict], base_dir: Path | None = None, models: Path | None = None) -> list:
    validator = Validator(
        Registry.load(models),
        JobDefaults(max_n_per_job=20),
        targets_openai=False,
        base_dir=base_dir,
        today=dt.date(2026, 1, 1),
    )
    checked = validator.check(read_jobs(pd.DataFrame(rows)))
    assert not checked.problems, checked.problems
    return checked.valid


def one(row: dict, **kw) -> ValidJob:
    return valid([row], **kw)[0]


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.load()


# ---------------------------------------------------------------- the gpt-image-2 size rule


@pytest.mark.parametrize(
    "size, low, medium, high",
    [
        ("1024x1024", 196, 1756, 7024),
        ("1536x1024", 158, 1372, 5488),
        ("2048x2048", 397, 3568, 14272),
        ("3840x2160", 371, 3336, 13342),
    ],
)
def test_gpt_image_2_rule_reproduces_the_published_token_figures(book, size, low, medium, high):
    prices = book.get("gpt-image-2")
    assert prices is not None
    assert [prices.tokens_out(q, size) for q in ("low", "medium", "high")] == [low, medium, high]


def test_snapshots_and_25_models_have_gpt_image_2_rates(book):
    base = book.get("gpt-image-2")
    for name in ("gpt-image-2-2026-04-21", "gpt-image-2.5-flare", "gpt-image-2.5-sunburst"):
        prices = book.get(name)
        assert prices is not None and base is not None
        assert (
            prices.rates
            == base.rates
            == {
                "text_input": D("5.0"),
                "text_cached_input": D("1.25"),
                "image_input": D("8.0"),
                "image_cached_input": D("2.0"),
                "image_output": D("30.0"),
            }
        )
        assert prices.tokens_out("high", "1024x1024") == 7024
        assert prices.tokens_out("xhigh", "1024x1024") is None  # not published: unknown
        assert prices.checked and prices.source


# ---------------------------------------------------------------- estimates


@pytest.mark.parametrize(
    "model, size, quality, each",
    [
        ("dall-e-2", "256x256", "", "0.016"),
        ("dall-e-2", "1024x1024", "", "0.020"),
        ("dall-e-3", "1024x1024", "standard", "0.04"),
        ("dall-e-3", "1792x1024", "hd", "0.12"),
        ("dall-e-3", "1024x1792", "standard", "0.08"),
    ],
)
def test_dalle_is_priced_per_image(book, model, size, quality, each):
    n = 1 if model == "dall-e-3" else 3
    job = one({"prompt": "a cat", "model": model, "size": size, "quality": quality, "n": n})
    est = estimate_unit(book, job, n)
    assert est.usd == est.worst_usd == D(each) * n
    assert "/image" in est.basis


@pytest.mark.parametrize(
    "model, size, quality, out_tokens, rate",
    [
        ("gpt-image-1", "1024x1024", "low", 272, 40),
        ("gpt-image-1", "1024x1536", "medium", 1584, 40),
        ("gpt-image-1", "1536x1024", "high", 6208, 40),
        ("gpt-image-2", "1024x1024", "low", 196, 30),
        ("gpt-image-2", "1536x1024", "high", 5488, 30),
        ("gpt-image-2", "1280x720", "medium", None, 30),
        ("gpt-image-2-2026-04-21", "2048x2048", "high", 14272, 30),
        ("gpt-image-2.5-flare", "2048x2048", "high", 14272, 30),
        ("gpt-image-2.5-sunburst-2026-09-08", "1024x1536", "medium", 1372, 30),
    ],
)
def test_gpt_image_generation_is_output_tokens_plus_prompt_tokens(
    book, model, size, quality, out_tokens, rate
):
    prompt = "a lighthouse at dusk, oil painting"  # 34 bytes
    job = one({"prompt": prompt, "model": model, "size": size, "quality": quality, "n": 2})
    if out_tokens is None:  # a free size: the rule, computed by hand for 1280x720 medium
        # short = round(48 * 720 / 1280) = 27; ceil(48 * 27 * (921600 + 2e6) / 4e6) = 947
        out_tokens = 947
    est = estimate_unit(book, job, 2)
    text_rate = D(5) / M
    expected = 2 * out_tokens * D(rate) / M + 9 * text_rate  # ceil(34 / 4) = 9 tokens
    worst = 2 * out_tokens * D(rate) / M + 34 * text_rate  # one token per byte
    assert est.usd == expected
    assert est.worst_usd == worst
    assert f"{out_tokens} output tokens/image" in est.basis


@pytest.mark.parametrize("quality", ["xhigh", "max"])
def test_25_qualities_without_published_figures_are_unknown(book, quality):
    job = one({"prompt": "x", "model": "gpt-image-2.5-sunburst", "quality": quality})
    est = estimate_unit(book, job, 1)
    assert est.usd is None and est.worst_usd is None
    assert f"no price for gpt-image-2.5-sunburst {quality} 1024x1024" in est.basis
    usage = {"input_tokens": 4, "output_tokens": 9000}
    assert price_call(book, job, 1, usage).usd == 4 * D(8) / M + 9000 * D(30) / M


def test_auto_quality_estimates_medium_and_reserves_high(book):
    job = one({"prompt": "x", "model": "gpt-image-2", "size": "1024x1024", "quality": "auto"})
    est = estimate_unit(book, job, 1)
    assert est.usd == 1756 * D(30) / M + D(5) / M
    assert est.worst_usd == 7024 * D(30) / M + D(5) / M
    assert "(quality auto as medium)" in est.basis


def test_auto_size_reserves_the_dearest_it_may_become(book):
    job = one({"prompt": "x", "model": "gpt-image-1", "size": "auto", "quality": "high"})
    est = estimate_unit(book, job, 1)
    assert est.usd == 4160 * D(40) / M + D(5) / M  # 1024x1024 first
    assert est.worst_usd == 6240 * D(40) / M + D(5) / M  # 1024x1536 dearest


def _png(path: Path, size: tuple[int, int], alpha: bool = False) -> str:
    Image.new("RGBA" if alpha else "RGB", size).save(path)
    return path.name


def test_edit_adds_input_image_tokens_for_every_source_and_the_mask(book, tmp_path):
    a = _png(tmp_path / "a.png", (1024, 1024))
    b = _png(tmp_path / "b.png", (2048, 1024))
    m = _png(tmp_path / "m.png", (1024, 1024), alpha=True)
    row = {
        "prompt": "swap",
        "operation": "edit",
        "model": "gpt-image-2",
        "size": "1024x1024",
        "quality": "low",
        "image": f"{a}|{b}",
        "mask": m,
    }
    est = estimate_unit(book, one(row, base_dir=tmp_path), 1)
    # tile rule: 1024x1024 -> 768x768 -> 4 tiles; 2048x1024 -> 1536x768 -> 6 tiles
    image_tokens = (65 + 129 * 4) + (65 + 129 * 6) + (65 + 129 * 4)
    assert est.usd == 196 * D(30) / M + 1 * D(5) / M + image_tokens * D(8) / M
    assert est.worst_usd == 196 * D(30) / M + 4 * D(5) / M + image_tokens * D(8) / M


def test_dalle2_edit_and_variation_are_priced_per_image(book, tmp_path):
    src = _png(tmp_path / "s.png", (512, 512), alpha=True)
    edit = {"prompt": "p", "operation": "edit", "model": "dall-e-2", "size": "512x512"}
    var = {"operation": "variation", "model": "dall-e-2", "size": "256x256"}
    e = estimate_unit(book, one({**edit, "image": src}, base_dir=tmp_path), 2)
    v = estimate_unit(book, one({**var, "image": src}, base_dir=tmp_path), 4)
    assert (e.usd, v.usd) == (D("0.036"), D("0.064"))


def test_a_model_without_prices_is_unknown_never_free(book, tmp_path):
    models = tmp_path / "models.toml"
    models.write_text(
        '[models."acme-image"]\nendpoints = ["generate"]\nmax_n_per_call = 4\n'
        'sizes = ["1024x1024"]\nqualities = ["high"]\nusage = true\n',
        encoding="utf-8",
    )
    job = one({"prompt": "x", "model": "acme-image", "quality": "high"}, models=models)
    est = estimate_unit(book, job, 1)
    assert est.usd is None and est.worst_usd is None
    assert "no prices for acme-image" in est.basis
    cost = price_call(book, job, 1, {"input_tokens": 1, "output_tokens": 100})
    assert cost.usd is None and cost.output_tokens == 100


def test_unpublished_size_or_quality_or_rate_is_unknown(book):
    mini = one({"prompt": "x", "model": "gpt-image-1-mini", "quality": "low"})
    assert estimate_unit(book, mini, 1).usd is None  # no input rates published
    dalle = one({"prompt": "x", "model": "dall-e-3", "size": "1024x1024", "quality": "hd"})
    assert estimate_unit(PriceBook.load(), dalle, 1).usd == D("0.08")


def test_batch_discount_halves_gpt_image(book):
    job = one({"prompt": "x", "model": "gpt-image-2", "quality": "high"})
    full, half = estimate_unit(book, job, 1), estimate_unit(book, job, 1, batch=True)
    assert full.usd is not None and half.usd == full.usd / 2


# ---------------------------------------------------------------- prices are data


def test_a_user_file_overrides_prices_without_code(tmp_path, monkeypatch):
    user = tmp_path / "prices.toml"
    user.write_text(
        '[prices."gpt-image-2"]\nimage_output = 60.0\nchecked = "2027-01-01"\n'
        '[prices."gpt-image-2.5-flare".output_rule.quality_factors]\nxhigh = 144\n'
        '[prices."gpt-image-1-mini"]\ntext_input = 2.0\nimage_input = 2.5\nimage_output = 8.0\n'
        "[estimate]\ntext_bytes_per_token = 1\n",
        encoding="utf-8",
    )
    book = PriceBook.load(user)
    two = book.get("gpt-image-2")
    assert two is not None and two.rates["image_output"] == D(60) and two.checked == "2027-01-01"
    assert two.rates["text_input"] == D(5)  # untouched keys stay
    flare = book.get("gpt-image-2.5-flare")
    assert flare is not None and flare.rates["image_output"] == D(60)  # same_as follows
    assert flare.tokens_out("xhigh", "1024x1024") is not None
    mini = one({"prompt": "abcd", "model": "gpt-image-1-mini", "quality": "low"})
    assert estimate_unit(book, mini, 1).usd == D("0.005") + 4 * D(2) / M
    monkeypatch.setenv("IMAGEBATCH_PRICES", str(user))
    assert PriceBook.load().get("gpt-image-2").rates["image_output"] == D(60)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('[prices."x"]\nimage_output = "lots"\n', "malformed"),
        ('[prices."x"]\nimage_output = -1.0\n', "malformed"),
        ('[prices."x"]\nprice = 1.0\n', "unknown keys ['price']"),
        ('[prices."x"]\nsame_as = "nobody"\n', "names a model with no prices"),
        ('[prices."x"]\nsame_as = "x"\n', "loops"),
        ("[prices\n", "not valid TOML"),
    ],
)
def test_bad_price_files_say_what_is_wrong(tmp_path, text, fragment):
    user = tmp_path / "p.toml"
    user.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        PriceBook.load(user)


def test_missing_prices_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="prices file not found"):
        PriceBook.load(tmp_path / "nope.toml")


# ---------------------------------------------------------------- actual cost from usage


def _usage(text: int, image: int, out: int) -> dict:
    return {
        "total_tokens": text + image + out,
        "input_tokens": text + image,
        "output_tokens": out,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image},
        "output_tokens_details": {"image_tokens": out, "text_tokens": 0},
    }


def test_usage_is_priced_with_text_image_and_output_rates_and_split_per_image(book):
    job = one({"prompt": "x", "model": "gpt-image-2", "quality": "high", "n": 3})
    cost = price_call(book, job, 3, _usage(100, 1000, 3 * 7024))
    expected = 100 * D(5) / M + 1000 * D(8) / M + 3 * 7024 * D(30) / M
    assert cost.usd == expected
    assert (cost.text_tokens, cost.image_tokens, cost.output_tokens) == (100, 1000, 21072)
    assert cost.share() == expected / 3


def test_image_input_tokens_are_not_priced_as_text(book):
    job = one({"prompt": "x", "model": "gpt-image-1", "quality": "low"})
    as_image = price_call(book, job, 1, _usage(0, 1000, 0)).usd
    as_text = price_call(book, job, 1, _usage(1000, 0, 0)).usd
    assert (as_image, as_text) == (D("0.01"), D("0.005"))


def test_usage_without_a_split_is_priced_at_the_dearer_input_rate(book):
    job = one({"prompt": "x", "model": "gpt-image-2", "quality": "low"})
    cost = price_call(book, job, 1, {"input_tokens": 1000, "output_tokens": 196})
    assert cost.usd == 1000 * D(8) / M + 196 * D(30) / M
    assert cost.text_tokens is None


@pytest.mark.parametrize("usage", [None, {}, {"output_tokens": "many"}, {"output_tokens": -5}])
def test_missing_or_garbled_usage_is_unknown_not_zero(book, usage):
    job = one({"prompt": "x", "model": "gpt-image-2", "quality": "low"})
    assert price_call(book, job, 1, usage).usd is None


def test_dalle_actual_cost_is_the_per_image_price_of_what_came_back(book):
    job = one({"prompt": "x", "model": "dall-e-2", "size": "512x512", "n": 5})
    cost = price_call(book, job, 5, None)
    assert cost.usd == D("0.090") and cost.share() == D("0.018")


# ---------------------------------------------------------------- the plan


def test_plan_groups_by_model_operation_size_quality(book):
    jobs = valid(
        [
            {"prompt": "a", "model": "dall-e-3", "size": "1024x1024", "quality": "hd", "n": 3},
            {"prompt": "b", "model": "dall-e-3", "size": "1024x1024", "quality": "hd"},
            {"prompt": "c", "model": "gpt-image-2", "quality": "low", "n": 12},
            {"prompt": "d", "model": "gpt-image-1-mini", "quality": "low"},
        ]
    )
    planned = plan_jobs(jobs)
    units = [u for p in planned for u in units_for(p, range(p.job.n))]
    plan = cost_plan(book, units)
    assert (plan.jobs, plan.requests, plan.images) == (4, 7, 17)
    lines = {(x.model, x.size, x.quality): x for x in plan.lines}
    hd = lines[("dall-e-3", "1024x1024", "hd")]
    assert (hd.requests, hd.images, hd.usd) == (4, 4, D("0.32"))
    low = lines[("gpt-image-2", "1024x1024", "low")]
    assert (low.requests, low.images) == (2, 12)  # 10 + 2 per call
    assert low.usd == 12 * 196 * D(30) / M + 2 * D(5) / M
    assert plan.unknown_images == 1 and lines[("gpt-image-1-mini", "1024x1024", "low")].usd is None
    assert plan.usd == hd.usd + low.usd
    assert plan.as_dict()["lines"][2]["estimate_usd"] is None
