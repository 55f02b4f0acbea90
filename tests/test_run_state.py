"""What a flow run tells automations and the UI: its final state and message, dated folders
with a `latest` pointer, escaped failure reports, and a key that is never a parameter."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest

import imagebatch
from imagebatch.flows.run_jobs import imagebatch_flow
from imagebatch.remote import MAX_ROWS, rows_parameter, submit
from imagebatch.simulator import SimConfig, SimulatorServer
from imagebatch.tasks.artifacts import escape_markdown, failures_markdown
from imagebatch.tasks.errors import ConfigError, OutputError
from imagebatch.tasks.manifest import Manifest
from imagebatch.tasks.rundirs import current_latest, dated_folder, mark_latest

KEY = "sk-test-state"


@pytest.fixture
def sim(monkeypatch):
    server = SimulatorServer(SimConfig(api_key=KEY)).start()
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    yield server
    server.stop()


def jobs_file(path: Path, forbidden: bool) -> Path:
    prompts = ["a red mug", "a blue mug"] + (["a forbidden mug"] if forbidden else [])
    pd.DataFrame({"prompt": prompts}).to_csv(path, index=False)
    return path


def flow_state(jobs: Path, out: Path, **overrides):
    return asyncio.run(
        imagebatch_flow(str(jobs), str(out), overrides=overrides or None, return_state=True)
    )


def test_final_state_carries_counts_and_follows_the_setting(prefect_api, sim, tmp_path):
    ok = flow_state(jobs_file(tmp_path / "ok.csv", False), tmp_path / "ok")
    assert ok.is_completed()
    assert ok.message.startswith("2 images: 2 succeeded")

    jobs = jobs_file(tmp_path / "bad.csv", True)
    failed = flow_state(jobs, tmp_path / "bad")
    assert failed.is_failed()  # the default: a run that lost images alerts someone
    assert failed.message.startswith("3 images: 2 succeeded, 1 rejected")

    lenient = flow_state(jobs, tmp_path / "lenient", flow={"fail_on_image_errors": False})
    assert lenient.is_completed()
    assert "1 rejected" in lenient.message


def test_a_run_stopped_by_a_bad_key_is_failed_whatever_the_setting(
    prefect_api, sim, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    state = flow_state(
        jobs_file(tmp_path / "jobs.csv", False),
        tmp_path / "out",
        flow={"fail_on_image_errors": False},
    )
    assert state.is_failed()
    assert "stopped early" in state.message
    assert "sk-wrong" not in state.message


async def stored_parameters(flow_run_id) -> dict:
    from prefect import get_client

    async with get_client() as client:
        return (await client.read_flow_run(flow_run_id)).parameters


def test_the_key_is_refused_as_a_parameter(prefect_api, sim, tmp_path):
    state = flow_state(
        jobs_file(tmp_path / "jobs.csv", False), tmp_path / "out", api={"api_key": KEY}
    )
    assert state.is_failed()
    assert "never a run parameter" in state.message
    assert not (tmp_path / "out" / "manifest.csv").exists()
    # Prefect stored the run's parameters before the flow refused them: without the key
    stored = asyncio.run(stored_parameters(state.state_details.flow_run_id))
    assert stored["overrides"]["api"] == {"api_key": "********"}
    assert KEY not in json.dumps(stored)
    with pytest.raises(ConfigError, match="never sent"):
        submit("jobs.csv", api_key=KEY)
    with pytest.raises(ConfigError, match="unknown setting"):
        imagebatch.run(tmp_path / "jobs.csv", out=tmp_path / "o2", api_key=KEY)


def test_rows_out_of_runs_go_to_dated_folders_and_latest_moves_forward(prefect_api, sim, tmp_path):
    rows = [{"prompt": "a red mug", "sku": "A1"}, {"prompt": "a blue mug", "sku": "A2"}]
    root = tmp_path / "runs"
    names = []
    for _ in range(2):
        state = asyncio.run(imagebatch_flow(rows, out_root=str(root), return_state=True))
        assert state.is_completed(), state.message
        names.append(current_latest(root))
    assert names[0] != names[1] and names[1] > names[0]
    for name in names:
        manifest = pd.read_csv(root / name / "manifest.csv")
        assert list(manifest["sku"]) == ["A1", "A2"]
    assert (root / "latest").resolve() == (root / names[1]).resolve()


def test_latest_never_moves_back_and_folders_are_never_reused(tmp_path):
    when = dt.datetime(2026, 12, 1, 2, 0, tzinfo=dt.UTC)
    newer = dated_folder(
        tmp_path, when + dt.timedelta(days=1), "0190aaaa-1111-7000-8000-00000000beef"
    )
    older = dated_folder(tmp_path, when, "0190aaaa-1111-7000-8000-00000000cafe")
    assert newer.name == "2026-12-02T020000.000Z-0000beef"
    assert mark_latest(newer) is True
    assert mark_latest(older) is False  # an older run finishing late does not win
    assert current_latest(tmp_path) == newer.name
    with pytest.raises(OutputError, match="already exists"):
        dated_folder(tmp_path, when, "0190aaaa-1111-7000-8000-00000000cafe")


def test_failure_report_escapes_text_from_csv_and_server():
    manifest = Manifest.build(
        [
            {
                "row": 1,
                "job_id": "a](http://evil)",
                "image_index": 0,
                "status": "failed",
                "error_code": "bad_request",
                "error_message": "<script>alert(1)</script>\n# not a heading | x",
            },
            {"row": 2, "job_id": None, "image_index": 0, "status": "succeeded"},
        ],
        [],
    )
    text = failures_markdown(manifest, "401 invalid_api_key: *nope*")
    assert "<script>" not in text and "\\<script\\>" in text
    assert "](http" not in text
    assert "\n# not a heading" not in text
    assert "\\*nope\\*" in text
    assert escape_markdown("x" * 400).endswith("…") and len(escape_markdown("x" * 400)) == 300


def test_a_frame_too_large_to_send_as_parameters_is_refused_clearly():
    big = pd.DataFrame({"prompt": ["a mug"] * (MAX_ROWS + 1)})
    with pytest.raises(ConfigError, match=r"5001 rows is more than 5000"):
        rows_parameter(big)
    wide = pd.DataFrame({"prompt": ["x" * 1000] * 3000})
    with pytest.raises(ConfigError, match="bytes as JSON"):
        rows_parameter(wide)
    assert rows_parameter(pd.DataFrame({"prompt": ["a", None]})) == [
        {"prompt": "a"},
        {"prompt": None},
    ]
