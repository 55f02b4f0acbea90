"""The memory budget end to end: CLI -> flow -> dispatcher -> limiter, against the simulator.

The dispatcher books each request's expected body in the limiter and gives the bytes back
only once its images are stored; a leak would leave the budget full and hang the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from imagebatch.cli import main
from imagebatch.simulator import SimConfig, SimulatorServer

KEY = "sk-memory-budget-0123456789"


@pytest.fixture
def sim():
    with SimulatorServer(SimConfig(latency=0.3, api_key=KEY)) as server:
        yield server


def _run(
    tmp_path: Path, sim: SimulatorServer, budget: int | None, flags: tuple[str, ...] = ()
) -> tuple[dict, dict]:
    jobs = tmp_path / "jobs.csv"
    rows = [
        {"id": f"j{i}", "prompt": f"a lighthouse {i}", "model": "gpt-image-2"} for i in range(6)
    ]
    pd.DataFrame(rows).to_csv(jobs, index=False)
    args = ["run", str(jobs), "--out", str(tmp_path / "out"), "-q", *flags]
    if budget is not None:
        config = tmp_path / "budget.toml"
        config.write_text(f"[limits]\nmax_bytes_in_flight = {budget}\n")
        args += ["--config", str(config)]
    env = {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": KEY}
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    return run["stats"]["limiter"], sim.stats()


def test_a_budget_smaller_than_any_answer_sends_one_request_at_a_time(prefect_api, sim, tmp_path):
    limiter, stats = _run(tmp_path, sim, budget=1)
    assert stats["images_billed"] == 6
    assert stats["peak_in_flight"] == 1  # each answer is over the budget: each goes alone
    assert limiter["bytes_in_flight"] == 0  # every answer's bytes came back once stored
    assert limiter["max_bytes_in_flight"] == 1
    # learned from the simulator's small PNGs: far below the 3 bytes per pixel assumed
    assert 0 < limiter["bytes_per_pixel_learned"]["gpt-image-2/png"] < 1


def test_the_default_budget_lets_requests_overlap(prefect_api, sim, tmp_path):
    sim.configure(latency=2.0)  # six jobs start well within one answer's time
    limiter, stats = _run(tmp_path, sim, budget=None)
    assert stats["images_billed"] == 6
    assert stats["peak_in_flight"] > 1
    assert limiter["max_bytes_in_flight"] == 256_000_000
    assert limiter["peak_bytes_in_flight"] > 0 and limiter["bytes_in_flight"] == 0


def test_the_budget_and_the_deadline_can_be_given_as_flags(prefect_api, sim, tmp_path):
    flags = ("--max-bytes-in-flight", "1.5MiB", "--request-deadline", "90")
    limiter, stats = _run(tmp_path, sim, budget=None, flags=flags)
    assert stats["images_billed"] == 6
    assert limiter["max_bytes_in_flight"] == 1_572_864
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["settings"]["api"]["request_deadline"] == 90


@pytest.mark.parametrize("value", ["lots", "-1MB", "12 parsecs", "nanMB"])
def test_a_budget_that_is_not_a_byte_count_is_refused_by_name(value, tmp_path):
    result = CliRunner().invoke(main, ["run", "jobs.csv", "--max-bytes-in-flight", value])
    assert result.exit_code == 2
    assert "--max-bytes-in-flight" in result.output and "not a byte count" in result.output
