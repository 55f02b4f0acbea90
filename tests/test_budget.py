"""The ledger and the cap: reservations, settlement, the boundary, and the dry-run plan."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from imagebatch.cli import main
from imagebatch.tasks.budget import Budget, CapReached

D = Decimal
ROOT = Path(__file__).resolve().parent.parent


def test_the_cap_admits_exactly_what_fits_in_decimal():
    budget = Budget(max_cost=D("1.00"))
    held = [budget.reserve(D("0.02"), "x") for _ in range(50)]  # float sums would miss one
    with pytest.raises(CapReached) as info:
        budget.reserve(D("0.02"), "x")
    assert info.value.stops and "would exceed --max-cost $1.00" in info.value.reason
    for r in held:
        budget.settle(r, D("0.02"))
    assert budget.spent == D("1.00") and budget.in_flight == 0


def test_in_flight_counts_at_worst_and_settles_at_actual():
    budget = Budget(max_cost=D("1.00"))
    a = budget.reserve(D("0.60"), "a")
    with pytest.raises(CapReached):
        budget.reserve(D("0.50"), "b")  # 0.60 in flight + 0.50 > 1.00
    budget.settle(a, D("0.10"))
    # Dispatching stopped for good: even a request that would now fit is refused.
    with pytest.raises(CapReached, match="cost cap"):
        budget.reserve(D("0.01"), "c")
    assert budget.spent == D("0.10")


def test_lost_and_unpriced_calls_count_at_their_worst_case():
    budget = Budget(max_cost=D("1.00"))
    budget.settle(budget.reserve(D("0.30"), "lost"), lost=True)
    budget.settle(budget.reserve(D("0.30"), "unpriced"), None)
    budget.settle(budget.reserve(D("0.30"), "error answer"))  # an error costs nothing
    assert (budget.possibly_paid, budget.unpriced, budget.spent) == (D("0.30"), D("0.30"), 0)
    assert budget.committed == D("0.60")
    budget.reserve(D("0.40"), "fits exactly")
    with pytest.raises(CapReached):
        budget.reserve(D("0.000001"), "one more")


def test_settling_twice_changes_nothing():
    budget = Budget(max_cost=D("1"))
    r = budget.reserve(D("0.5"), "x")
    budget.settle(r, D("0.2"))
    budget.settle(r, D("0.2"))
    assert budget.spent == D("0.2") and budget.in_flight == 0 and budget.requests_in_flight == 0


def test_an_unpriced_request_is_refused_under_a_cap_without_stopping_the_rest():
    budget = Budget(max_cost=D("1"))
    with pytest.raises(CapReached) as info:
        budget.reserve(None, "acme-image high 1024x1024")
    assert not info.value.stops and "no price for acme-image" in info.value.reason
    budget.reserve(D("0.5"), "priced")  # still dispatching
    assert Budget().reserve(None, "uncapped runs send it").worst == 0


def test_total_cap_counts_what_the_folder_already_spent():
    budget = Budget(max_cost_total=D("5"), folder_spent=D("4.50"))
    budget.reserve(D("0.5"), "x")
    with pytest.raises(CapReached, match=re.escape("this folder had spent $4.50")):
        budget.reserve(D("0.01"), "y")
    both = Budget(max_cost=D("0.3"), max_cost_total=D("100"), folder_spent=D("1"))
    with pytest.raises(CapReached, match=re.escape("--max-cost $0.3")):
        both.reserve(D("0.31"), "z")


# ---------------------------------------------------------------- the plan on the command line


def invoke(args: list[str]):
    return CliRunner().invoke(main, args, env={}, catch_exceptions=False)


def test_dry_run_prints_the_plan_and_sends_nothing(tmp_path):
    # Its own jobs file, so the example catalog can change without breaking this arithmetic.
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        "prompt,model,size,quality,n\n"
        "a wide poster,dall-e-3,1792x1024,hd,3\n"
        "a red mug,gpt-image-2,1024x1024,high,1\n"
        "too small,dall-e-3,512x512,standard,1\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    args = ["run", str(jobs), "--out", str(out), "--dry-run", "--simulate", "--max-cost", "0.5"]
    result = invoke(args)
    assert result.exit_code == 1, result.output  # row 3 is invalid, as in a real run
    text = result.output
    assert "Plan: 2 jobs, 4 requests, 4 images (nothing sent)" in text
    assert "dall-e-3 generate 1792x1024 hd: 3 request(s), 3 image(s), $0.3600 ($0.12/image)" in text
    assert "gpt-image-2 generate 1024x1024 high: 1 request(s), 1 image(s), $0.2107" in text
    assert "7024 output tokens/image at $30/1M" in text
    # 0.36 + 7024 x $30/1M (0.21072) + ~3 prompt tokens at $5/1M
    assert "Estimated cost: $0.5707 (worst case $0.5708)" in text
    assert "Worst case $0.5708 exceeds --max-cost $0.5000" in text
    assert not out.exists()  # nothing written, no simulator started


def test_validate_prints_the_plan_and_unpriced_models_as_unknown(tmp_path):
    models = tmp_path / "models.toml"
    models.write_text(
        '[models."acme-image"]\nendpoints = ["generate"]\nmax_n_per_call = 4\n'
        'sizes = ["1024x1024"]\nqualities = ["high"]\nusage = true\n',
        encoding="utf-8",
    )
    jobs = tmp_path / "jobs.csv"
    pd.DataFrame(
        [
            {"prompt": "[bold]x[/]", "model": "acme-image", "quality": "high", "n": 2},
            {"prompt": "y", "model": "gpt-image-2", "quality": "low", "n": 1},
        ]
    ).to_csv(jobs, index=False)
    result = invoke(["validate", str(jobs), "--models", str(models)])
    assert result.exit_code == 0, result.output
    assert "acme-image generate 1024x1024 high: 1 request(s), 2 image(s), unknown" in result.output
    assert "no prices for acme-image" in result.output
    assert "2 image(s) with no price: unknown" in result.output


def test_a_prices_file_changes_the_estimate(tmp_path):
    prices = tmp_path / "p.toml"
    prices.write_text('[prices."dall-e-3"]\nper_image = { "hd/1024x1024" = 1.5 }\n', "utf-8")
    jobs = tmp_path / "jobs.csv"
    pd.DataFrame([{"prompt": "x", "model": "dall-e-3", "quality": "hd"}]).to_csv(jobs, index=False)
    # --simulate: dall-e-3 is retired on api.openai.com, so a run there would refuse the row
    result = invoke(["run", str(jobs), "--dry-run", "--prices", str(prices), "--simulate"])
    assert result.exit_code == 0, result.output
    assert "Estimated cost: $1.5000" in result.output


def test_estimate_leaves_out_what_the_folder_has_and_counts_its_spend(tmp_path):
    import json

    import imagebatch
    from imagebatch.tasks.journal import ImageRecord
    from imagebatch.tasks.plan import plan_jobs

    jobs = pd.DataFrame([{"prompt": p, "model": "dall-e-3", "quality": "hd"} for p in "xy"])
    first = imagebatch.estimate(jobs, simulate=True)
    assert (first.plan.images, first.skipped, first.folder_spent) == (2, 0, 0)
    key = plan_jobs(first.checked.valid)[0].keys[0]
    out = tmp_path / "out"
    out.mkdir()
    made = ImageRecord(key=key, job_id="j", index=0, status="succeeded", cost_usd=0.08)
    lost = ImageRecord(key="other", job_id="k", index=0, status="failed", possibly_paid_usd=0.5)
    lines = [json.dumps(r.__dict__) for r in (made, lost)]
    (out / "journal.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    again = imagebatch.estimate(jobs, out, simulate=True, max_cost_total=0.6)
    assert (again.plan.images, again.skipped) == (1, 1)
    assert again.folder_spent == D("0.58") and again.plan.usd == D("0.08")
    assert again.max_cost_total == D("0.6")


def test_a_call_booked_by_an_earlier_run_adds_only_its_priced_cost():
    """A Batch API line booked before a restart has no reservation in this run: its cost
    still counts, nothing is in flight, and an unpriced one adds nothing it could not know."""
    budget = Budget(max_cost=D("1"))
    budget.settle(None, D("0.25"))
    budget.settle(None, None)
    assert budget.spent == D("0.25") and budget.in_flight == 0 and budget.requests_in_flight == 0
    assert budget.unpriced_calls == 0
