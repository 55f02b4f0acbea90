"""Spend control end to end: the cap under concurrency, cost per image, resume after a cap stop.

Real simulator on loopback, real Prefect API, driven through the CLI.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from imagebatch.cli import main

D = Decimal
M = D(1_000_000)
# A round price so the boundary is plain: a cap of $1.00 holds exactly 100 images.
PRICES = '[prices."dall-e-2"]\nper_image = { "standard/256x256" = 0.01 }\n'


def run(sim, args: list[str]):
    env = {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-test"}
    return CliRunner().invoke(main, ["run", *args, "-q"], env=env, catch_exceptions=False)


def dalle_jobs(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "jobs.csv"
    rows = [{"prompt": f"tile {i}", "model": "dall-e-2", "size": "256x256"} for i in range(count)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def prices_file(tmp_path: Path) -> str:
    path = tmp_path / "prices.toml"
    path.write_text(PRICES, encoding="utf-8")
    return str(path)


def outcome(out: Path) -> tuple[pd.DataFrame, dict]:
    return pd.read_csv(out / "manifest.csv"), json.loads((out / "run.json").read_text())


def total(values) -> Decimal:
    return sum((D(str(v)) for v in values if pd.notna(v)), D(0))


def test_cap_stops_dispatch_exactly_at_the_boundary_with_64_in_flight(
    prefect_api, fresh_sim, tmp_path
):
    # The simulator holds every request until 64 are in flight, so the cap is checked while
    # 64 requests are outstanding, not one after another.
    fresh_sim.configure(hold_until_in_flight=64)
    jobs, out = dalle_jobs(tmp_path, 300), tmp_path / "out"
    args = [str(jobs), "--out", str(out), "--prices", prices_file(tmp_path)]
    result = run(
        fresh_sim, [*args, "--max-cost", "1", "--max-in-flight", "64", "--task-per", "chunk"]
    )
    assert result.exit_code == 1, result.output
    manifest, run_json = outcome(out)
    assert manifest.status.value_counts().to_dict() == {"not_run": 200, "succeeded": 100}
    stats = fresh_sim.stats()
    assert stats["requests_seen"] == 100 and stats["images_billed"] == 100  # nothing beyond
    assert stats["peak_in_flight"] == 64
    assert total(manifest.cost_usd) == D("1.00")
    not_run = manifest[manifest.status == "not_run"]
    assert (not_run.error_code == "cost_cap").all()
    assert not_run.error_message.str.startswith("cost cap: ").all()
    cost = run_json["cost"]
    assert cost["actual_usd"] == 1.0 and cost["peak_requests_in_flight"] == 64
    assert "--max-cost $1.00" in cost["stopped_by_cap"]
    assert "Dispatching stopped at the cost cap" in result.output


def test_gpt_image_cap_is_never_exceeded_by_actual_spend(prefect_api, fresh_sim, tmp_path):
    rows = [
        {"prompt": f"a study of light number {i}", "model": "gpt-image-2", "quality": q}
        for i in range(40)
        for q in ("high", "low")
    ]
    jobs, out = tmp_path / "jobs.csv", tmp_path / "out"
    pd.DataFrame(rows).to_csv(jobs, index=False)
    cap = D("2.00")
    result = run(fresh_sim, [str(jobs), "--out", str(out), "--max-cost", str(cap)])
    assert result.exit_code == 1, result.output
    manifest, run_json = outcome(out)
    spent = total(manifest.cost_usd)
    assert spent <= cap
    # It stopped because the next request did not fit, not early: what is left under the cap
    # is less than one high-quality image's worst case.
    assert cap - spent < D("0.2110")
    assert set(manifest.status) == {"succeeded", "not_run"}
    assert (manifest[manifest.status == "not_run"].error_code == "cost_cap").all()
    assert D(str(run_json["cost"]["committed_usd"])) <= cap


def test_cost_per_image_comes_from_usage_split_across_the_call(prefect_api, fresh_sim, tmp_path):
    jobs, out = tmp_path / "jobs.csv", tmp_path / "out"
    prompt = "a ceramic teapot, matte glaze"
    pd.DataFrame([{"prompt": prompt, "model": "gpt-image-2", "quality": "low", "n": 3}]).to_csv(
        jobs, index=False
    )
    assert run(fresh_sim, [str(jobs), "--out", str(out)]).exit_code == 0
    manifest, run_json = outcome(out)
    assert (manifest.call_images == 3).all()
    assert (manifest.call_output_tokens == 3 * 196).all()  # the published low 1024x1024 figure
    text = int(manifest.call_text_tokens.iloc[0])
    assert text > 0 and (manifest.call_image_tokens == 0).all()
    call = text * D(5) / M + 3 * 196 * D(30) / M
    assert total(manifest.cost_usd) == pytest.approx(call, abs=D("1e-12"))
    assert manifest.input_tokens.tolist() == pytest.approx([text / 3] * 3)
    assert manifest.output_tokens.tolist() == [196.0] * 3
    cost = run_json["cost"]
    assert D(str(cost["actual_usd"])) == pytest.approx(call, abs=D("1e-12"))
    assert cost["estimated_usd_of_made"] == pytest.approx(cost["actual_usd"], rel=0.01)
    assert cost["plan"]["images"] == 3


def test_edit_input_images_are_billed_and_priced_as_image_tokens(prefect_api, fresh_sim, tmp_path):
    from PIL import Image

    Image.new("RGB", (1024, 1024), "white").save(tmp_path / "src.png")
    jobs, out = tmp_path / "jobs.csv", tmp_path / "out"
    row = {"prompt": "add a hat", "operation": "edit", "image": "src.png", "quality": "low"}
    pd.DataFrame([{**row, "model": "gpt-image-2"}]).to_csv(jobs, index=False)
    assert run(fresh_sim, [str(jobs), "--out", str(out)]).exit_code == 0
    manifest, _ = outcome(out)
    image_tokens = int(manifest.call_image_tokens.iloc[0])
    text_tokens = int(manifest.call_text_tokens.iloc[0])
    assert image_tokens > text_tokens > 0
    expected = text_tokens * D(5) / M + image_tokens * D(8) / M + 196 * D(30) / M
    assert D(str(manifest.cost_usd.iloc[0])) == pytest.approx(expected, abs=D("1e-12"))


def test_resume_after_a_cap_stop_and_the_folder_total(prefect_api, fresh_sim, tmp_path):
    jobs, out = dalle_jobs(tmp_path, 150), tmp_path / "out"
    args = [str(jobs), "--out", str(out), "--prices", prices_file(tmp_path)]
    assert run(fresh_sim, [*args, "--max-cost", "0.5"]).exit_code == 1
    manifest, _ = outcome(out)
    assert (manifest.status == "succeeded").sum() == 50
    # --max-cost counts this run only: 0.30 more is 30 more images.
    assert run(fresh_sim, [*args, "--max-cost", "0.3"]).exit_code == 1
    assert (outcome(out)[0].status == "succeeded").sum() == 80
    # --max-cost-total counts what the folder spent ($0.80): $0.95 leaves room for 15.
    result = run(fresh_sim, [*args, "--max-cost-total", "0.95"])
    assert result.exit_code == 1
    manifest, run_json = outcome(out)
    assert (manifest.status == "succeeded").sum() == 95
    assert run_json["cost"]["folder_spent_before_usd"] == pytest.approx(0.80)
    assert "this folder had spent $0.80" in run_json["cost"]["stopped_by_cap"]
    # Without a cap the rest is made, and nothing done before is requested again.
    before = fresh_sim.stats()["requests_seen"]
    assert run(fresh_sim, args).exit_code == 0
    manifest, run_json = outcome(out)
    assert (manifest.status == "succeeded").all()
    assert fresh_sim.stats()["requests_seen"] - before == 55
    assert run_json["cost"]["folder_spent_usd"] == pytest.approx(1.50)


def test_unpriced_model_is_not_sent_under_a_cap_but_the_rest_runs(prefect_api, fresh_sim, tmp_path):
    jobs, out = tmp_path / "jobs.csv", tmp_path / "out"
    rows = [
        {"prompt": "priced", "model": "gpt-image-2", "quality": "low"},
        {"prompt": "unpriced", "model": "gpt-image-1-mini", "quality": "low"},  # no input rates
    ]
    pd.DataFrame(rows).to_csv(jobs, index=False)
    result = run(fresh_sim, [str(jobs), "--out", str(out), "--max-cost", "5"])
    assert result.exit_code == 1
    manifest, run_json = outcome(out)
    assert manifest.status.tolist() == ["succeeded", "not_run"]
    assert manifest.error_code.tolist()[1] == "cost_cap"
    assert "no price for gpt-image-1-mini" in manifest.error_message.tolist()[1]
    assert run_json["cost"]["stopped_by_cap"] is None
    # Without a cap it is sent, and its cost is unknown, never zero.
    assert run(fresh_sim, [str(jobs), "--out", str(out)]).exit_code == 0
    manifest, run_json = outcome(out)
    assert manifest.status.tolist() == ["succeeded", "succeeded"]
    assert pd.isna(manifest.cost_usd.iloc[1]) and manifest.call_output_tokens.iloc[1] > 0
    assert run_json["cost"]["unpriced_calls"] == 1


def test_requests_lost_after_sending_are_priced_as_possibly_paid(prefect_api, fresh_sim, tmp_path):
    fresh_sim.configure(drop_rate=1.0)  # bill, then drop the connection
    jobs, out = dalle_jobs(tmp_path, 2), tmp_path / "out"
    args = [str(jobs), "--out", str(out), "--prices", prices_file(tmp_path)]
    result = run(fresh_sim, [*args, "--on-ambiguous", "fail", "--max-cost", "0.015"])
    assert result.exit_code == 1
    manifest, run_json = outcome(out)
    # The first was sent and lost (it may have been billed); the second never fit beside it.
    assert manifest.status.tolist() in (["failed", "not_run"], ["not_run", "failed"])
    assert run_json["cost"]["possibly_paid_usd"] == pytest.approx(0.01)
    # Not retried (--on-ambiguous fail): it may have been paid once, never twice (issue 14).
    assert run_json["cost"]["possibly_paid_twice_images"] == 0
    assert fresh_sim.stats()["requests_seen"] == 1


def test_batch_lines_are_priced_at_the_batch_discount(prefect_api, fresh_sim, tmp_path):
    config = tmp_path / "batch.toml"
    config.write_text("[batch]\npoll_seconds = 0.05\n", encoding="utf-8")
    jobs, out = tmp_path / "jobs.csv", tmp_path / "out"
    pd.DataFrame([{"prompt": "a lamp", "model": "gpt-image-2", "quality": "low", "n": 2}]).to_csv(
        jobs, index=False
    )
    args = [str(jobs), "--out", str(out), "--batch", "--config", str(config)]
    assert run(fresh_sim, args).exit_code == 0
    manifest, run_json = outcome(out)
    assert set(manifest.transport) == {"batch"}
    text = int(manifest.call_text_tokens.iloc[0])
    live = text * D(5) / M + 2 * 196 * D(30) / M
    assert total(manifest.cost_usd) == pytest.approx(live / 2, abs=D("1e-12"))
    assert D(str(run_json["cost"]["actual_usd"])) == pytest.approx(live / 2, abs=D("1e-12"))
    assert run_json["cost"]["plan"]["estimate_usd"] == pytest.approx(float(live / 2), rel=0.01)
    # A batch run is capped too: each line's worst case is booked before it is submitted
    # (tests/test_batch_run.py proves a line that does not fit is never submitted).
    capped = run(fresh_sim, [*args, "--max-cost", "1", "--force"])
    assert capped.exit_code == 0, capped.output
    manifest, run_json = outcome(out)
    assert run_json["cost"]["max_cost"] == 1.0
    assert D(str(run_json["cost"]["spent_usd"])) == pytest.approx(live / 2, abs=D("1e-12"))


def test_the_cap_can_come_from_the_config(prefect_api, fresh_sim, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'[cost]\nmax_cost = 0.2\nprices = "{prices_file(tmp_path)}"\n', "utf-8")
    jobs, out = dalle_jobs(tmp_path, 40), tmp_path / "out"
    assert run(fresh_sim, [str(jobs), "--out", str(out), "--config", str(config)]).exit_code == 1
    manifest, run_json = outcome(out)
    assert (manifest.status == "succeeded").sum() == 20
    assert run_json["settings"]["cost"]["max_cost"] == 0.2
