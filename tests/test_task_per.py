"""`[flow] task_per`: one Prefect task per job for small runs, chunk tasks for large ones,
with the requests in flight kept at the cap across chunk edges. Driven through the CLI
against the simulator on loopback and the session's real Prefect API."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner

from imagebatch.cli import main

# A round price: a cap of $0.10 holds exactly 10 images.
PRICES = '[prices."dall-e-2"]\nper_image = { "standard/256x256" = 0.01 }\n'


def run(sim, args: list[str]):
    env = {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-test"}
    return CliRunner().invoke(main, ["run", *args, "-q"], env=env, catch_exceptions=False)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def jobs_file(tmp_path: Path, ids: list[str], forbidden: str | None = None) -> str:
    rows = [
        {
            "id": job_id,
            "prompt": f"a {'forbidden ' if job_id == forbidden else ''}tile {job_id}",
            "model": "dall-e-2",
            "size": "256x256",
        }
        for job_id in ids
    ]
    path = tmp_path / "jobs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def task_runs_of(out: Path, expected: int) -> dict[str, dict[str, Any]]:
    """The task runs (name -> state type, message) of the last flow run that wrote `out`, once
    Prefect has recorded `expected` of them in a final state (its recorder is asynchronous)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        recent = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=50)
        ids = [r.id for r in recent if r.parameters.get("out") == str(out)][:1]
        assert ids, f"no flow run wrote {out}"
        only = FlowRunFilter(id=FlowRunFilterId(any_=ids))
        deadline = time.monotonic() + 120  # a hang detector, not a speed test
        while True:
            runs = client.read_task_runs(flow_run_filter=only)
            final = {r.name: r.state for r in runs if r.state is not None and r.state.is_final()}
            if len(final) >= expected or time.monotonic() > deadline:
                return {
                    name: {"type": s.type.value, "message": s.message or ""}
                    for name, s in final.items()
                }
            time.sleep(0.5)


@pytest.mark.parametrize("count", [5, 6])
def test_auto_runs_small_runs_per_job_and_large_runs_in_chunks(
    prefect_api, fresh_sim, tmp_path, count
):
    config = write(tmp_path, "imagebatch.toml", "[flow]\nauto_chunk_above = 5\nchunk_jobs = 4\n")
    tag = f"t{count}"
    ids = [f"{tag}-{i}" for i in range(count)]
    out = tmp_path / "out"
    jobs = jobs_file(tmp_path, ids, forbidden=ids[1])
    result = run(fresh_sim, [jobs, "--out", str(out), "--config", config])
    assert result.exit_code == 1, result.output  # the forbidden prompt is rejected
    manifest = pd.read_csv(out / "manifest.csv")
    assert manifest.status.value_counts().to_dict() == {"succeeded": count - 1, "rejected": 1}
    if count <= 5:  # up to auto_chunk_above jobs: one task per job, named by its id
        runs = task_runs_of(out, count)
        assert set(runs) == set(ids)
        assert runs[ids[1]]["type"] == "FAILED"
        assert runs[ids[1]]["message"].startswith("1 of 1 images not made (content_policy")
        assert {runs[i]["type"] for i in ids if i != ids[1]} == {"COMPLETED"}
    else:  # above: chunks of chunk_jobs jobs, the failed image named in its chunk's state
        runs = task_runs_of(out, 2)
        assert set(runs) == {"jobs 1-4", "jobs 5-6"}
        assert runs["jobs 1-4"]["type"] == "FAILED"
        assert runs["jobs 1-4"]["message"].startswith(
            "1 of 4 images in this chunk not made (content_policy"
        )
        assert runs["jobs 5-6"]["type"] == "COMPLETED"


def test_chunks_keep_the_cap_in_flight_across_a_chunk_edge(prefect_api, fresh_sim, tmp_path):
    # Every request is held until 8 are in flight at once. A chunk carries 6 jobs, so 8 in
    # flight needs the second chunk to start while all of the first chunk's requests are
    # still unanswered: chunks that ran one after another would never get there (the hold
    # then gives up after 60 s and the peak stays at 6).
    fresh_sim.configure(hold_until_in_flight=8)
    config = write(tmp_path, "imagebatch.toml", '[flow]\ntask_per = "chunk"\nchunk_jobs = 6\n')
    out = tmp_path / "out"
    jobs = jobs_file(tmp_path, [f"e{i}" for i in range(18)])
    result = run(fresh_sim, [jobs, "--out", str(out), "--config", config, "--max-in-flight", "8"])
    assert result.exit_code == 0, result.output
    assert (pd.read_csv(out / "manifest.csv").status == "succeeded").sum() == 18
    stats = fresh_sim.stats()
    assert stats["peak_in_flight"] == 8 and stats["images_billed"] == 18


def test_a_cap_stop_in_chunks_leaves_later_jobs_not_run_and_resumes_across_modes(
    prefect_api, fresh_sim, tmp_path
):
    config = write(tmp_path, "imagebatch.toml", "[flow]\nauto_chunk_above = 5\nchunk_jobs = 4\n")
    prices = write(tmp_path, "prices.toml", PRICES)
    ids = [f"r{i:02d}" for i in range(30)]
    jobs, out = jobs_file(tmp_path, ids), tmp_path / "out"
    base = [jobs, "--out", str(out), "--config", config, "--prices", prices]

    def statuses() -> dict[str, str]:
        m = pd.read_csv(out / "manifest.csv")
        return dict(zip(m.job_id, m.status, strict=True))

    # Per job, stopped by the cost cap after 10 images: the rest were never sent.
    first = run(fresh_sim, [*base, "--task-per", "job", "--max-cost", "0.10"])
    assert first.exit_code == 1, first.output
    done = {j for j, s in statuses().items() if s == "succeeded"}
    assert len(done) == 10 and set(statuses().values()) == {"succeeded", "not_run"}

    # Auto with 20 jobs left (above 5): chunks, stopped by the cap again after 10 more.
    second = run(fresh_sim, [*base, "--max-cost", "0.10"])
    assert second.exit_code == 1, second.output
    now = statuses()
    assert {j for j in done if now[j] == "succeeded"} == done  # kept, not redone
    assert list(now.values()).count("succeeded") == 20
    assert list(now.values()).count("not_run") == 10
    runs = task_runs_of(out, 1)  # this folder's flow runs: only the last is read
    assert runs and all(name.startswith("jobs ") for name in runs)

    # Explicit chunks finish the rest; no image was sent twice across the three modes.
    third = run(fresh_sim, [*base, "--task-per", "chunk"])
    assert third.exit_code == 0, third.output
    assert set(statuses().values()) == {"succeeded"}
    assert fresh_sim.stats()["images_billed"] == 30
    spent = pd.read_csv(out / "manifest.csv").cost_usd.map(lambda v: Decimal(str(v))).sum()
    assert spent == Decimal("0.30")


def test_an_unknown_task_per_from_python_is_refused_before_the_run(tmp_path):
    from imagebatch.configs.errors import ConfigError
    from imagebatch.flows.run_jobs import run_jobs

    jobs, out = jobs_file(tmp_path, ["u0"]), tmp_path / "out"
    with pytest.raises(ConfigError, match="task_per must be one of auto, job, chunk"):
        run_jobs(jobs, out, task_per="jobs", simulate=True)
    assert not out.exists()
