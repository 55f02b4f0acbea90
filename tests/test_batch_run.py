"""`imagebatch run --batch` end to end against the simulator's Batch API.

The simulator runs in-process on loopback so its counters (batches created, images billed)
can be read directly; runs that must be killed are real CLI subprocesses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import kill_at_commit, wait_for, write_jobs

from imagebatch.cli import main
from imagebatch.simulator import SimConfig, SimulatorServer

KEY = "sk-test-batch"
ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "data" / "sources"


@pytest.fixture
def sim():
    server = SimulatorServer(SimConfig(latency=0.0)).start()
    yield server
    server.stop()


def env(sim: SimulatorServer) -> dict[str, str]:
    return {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": KEY}


def config(tmp_path: Path, **batch: Any) -> Path:
    values = {"poll_seconds": 0.05, **batch}
    lines = ["[job]", "max_n_per_job = 12", "[batch]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = tmp_path / "batch.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(sim: SimulatorServer, args: list[str]):
    return CliRunner().invoke(main, ["run", *args], env=env(sim), catch_exceptions=False)


def manifest(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "manifest.csv", keep_default_na=False, na_values=[""])


def ledger(out: Path) -> list[dict]:
    path = out / "batches.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def batch_stats(sim: SimulatorServer) -> dict[str, Any]:
    return sim.stats()["batch"]


def assert_files_verify(out: Path, m: pd.DataFrame) -> None:
    for row in m[m.status == "succeeded"].itertuples():
        data = (out / row.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256


MIXED = [
    {"id": "g2", "prompt": "a teapot", "model": "gpt-image-2", "n": 3, "quality": "low"},
    {"id": "g1", "prompt": "a lamp", "model": "gpt-image-1", "n": 12, "quality": "low"},
    # url results (DALL·E) are downloaded at once, as live ones are
    {"id": "d3", "prompt": "a fox", "model": "dall-e-3", "n": 3, "response_format": "url"},
    {"id": "g2b", "prompt": "an owl", "model": "gpt-image-2", "n": 1, "quality": "medium"},
]


def _latest_artifact(key: str) -> str:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactCollectionFilter,
        ArtifactCollectionFilterKey,
    )

    async def read() -> str:
        async with get_client() as client:
            found = await client.read_latest_artifacts(
                artifact_filter=ArtifactCollectionFilter(
                    key=ArtifactCollectionFilterKey(any_=[key])
                )
            )
            assert found, f"no artifact {key}"
            return found[0].data

    return asyncio.run(read())


# --------------------------------------------------------------------------- one batch
def test_mixed_catalog_goes_through_one_batch_with_n_split(sim, prefect_api, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.csv", MIXED)
    out = tmp_path / "out"
    result = run_cli(
        sim, [str(jobs), "--out", str(out), "--batch", "--config", str(config(tmp_path)), "-q"]
    )
    assert result.exit_code == 0, result.output
    m = manifest(out)
    assert len(m) == 19 and set(m.status) == {"succeeded"}
    assert set(m.transport) == {"batch"} and m.batch_id.nunique() == 1
    assert_files_verify(out, m)
    stats = batch_stats(sim)
    assert stats["batches_created"] == 1 and stats["files_uploaded"] == 1
    # n split as the models allow: gpt-image-1 12 -> 10 + 2; dall-e-3 one per line.
    assert stats["lines_run"] == 1 + 2 + 3 + 1
    assert sim.stats()["images_billed"] == 19
    assert sim.stats()["files_served"] == 3  # dall-e-3's url results, fetched at once
    # Waiting shows in Prefect too: the batches' progress as a table artifact.
    rows = json.loads(_latest_artifact("imagebatch-batches"))
    assert rows[-1]["batch"] == m.batch_id.iloc[0] and rows[-1]["status"] == "completed"
    assert rows[-1]["completed"] == 7 and rows[-1]["failed"] == 0
    # Batch lines run through the simulator's image handler; nothing else came in (no live call).
    assert sim.stats()["requests_seen"] == stats["lines_run"]
    # A rerun finds everything done and sends nothing.
    again = run_cli(
        sim, [str(jobs), "--out", str(out), "--batch", "--config", str(config(tmp_path)), "-q"]
    )
    assert again.exit_code == 0 and batch_stats(sim)["batches_created"] == 1


def test_edit_goes_as_json_and_variations_go_live_or_are_refused(sim, prefect_api, tmp_path):
    import shutil

    for name in ("mug.png", "mug_mask.png"):
        shutil.copy(SOURCES / name, tmp_path / name)
    rows = [
        {
            "id": "e",
            "prompt": "a blue mug",
            "model": "gpt-image-1",
            "operation": "edit",
            "image": "mug.png",
            "mask": "mug_mask.png",
            "quality": "low",
        },
        {"id": "g", "prompt": "a cup", "model": "gpt-image-1", "quality": "low"},
        {
            "id": "v",
            "model": "dall-e-2",
            "operation": "variation",
            "image": "mug.png",
            "size": "256x256",
        },
    ]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    result = run_cli(
        sim, [str(jobs), "--out", str(out), "--batch", "--config", str(config(tmp_path)), "-q"]
    )
    assert result.exit_code == 0, result.output
    m = manifest(out).set_index("job_id")
    assert set(m.status) == {"succeeded"}
    assert m.loc["e", "transport"] == "batch" and m.loc["g", "transport"] == "batch"
    assert m.loc["v", "transport"] == "live"  # variations cannot go in a batch
    assert m.loc["e", "batch_id"] != m.loc["g", "batch_id"]  # one endpoint per batch
    assert batch_stats(sim)["batches_created"] == 2
    assert sim.stats()["per_endpoint"]["variations"] == 1
    assert sim.stats()["requests_seen"] == batch_stats(sim)["lines_run"] + 1

    # The edit's line carried the source and mask as data URLs with their MIME type.
    edits = [e for e in ledger(out) if e["event"] == "part" and e["endpoint"] == "/v1/images/edits"]
    assert len(edits) == 1

    refused = tmp_path / "refused"
    cfg = config(tmp_path, not_batchable="refuse")
    result = run_cli(sim, [str(jobs), "--out", str(refused), "--batch", "--config", str(cfg), "-q"])
    assert result.exit_code == 1
    m = manifest(refused).set_index("job_id")
    assert m.loc["v", "status"] == "not_run" and m.loc["v", "error_code"] == "not_batchable"
    assert "variations are not served by the Batch API" in m.loc["v", "error_message"]


def test_edit_line_is_the_json_form(tmp_path):
    from imagebatch.configs.registry import Registry
    from imagebatch.configs.settings import JobDefaults
    from imagebatch.tasks.batch_lines import line
    from imagebatch.tasks.plan import plan_jobs, units_for
    from imagebatch.tasks.read_jobs import read_jobs
    from imagebatch.tasks.validate import Validator

    jpeg = tmp_path / "photo.jpg"
    from PIL import Image

    Image.new("RGB", (64, 64), (1, 2, 3)).save(jpeg, "JPEG")
    rows = [
        {"prompt": "p", "model": "gpt-image-1", "operation": "edit", "image": str(jpeg), "n": 2}
    ]
    checked = Validator(
        Registry.load(), JobDefaults(), targets_openai=False, base_dir=tmp_path
    ).check(read_jobs(pd.DataFrame(rows)))
    assert not checked.invalid, checked.problems
    [planned] = plan_jobs(checked.valid)
    [unit] = units_for(planned, range(2))
    record = json.loads(line(unit))
    assert record["url"] == "/v1/images/edits" and record["method"] == "POST"
    assert record["custom_id"] == "ib-" + unit.key
    body = record["body"]
    assert body["n"] == 2 and "response_format" not in body
    [ref] = body["images"]
    assert ref["image_url"].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(ref["image_url"].split(",", 1)[1]) == jpeg.read_bytes()


def test_failed_lines_and_refusals_are_recorded_like_live_errors(sim, prefect_api, tmp_path):
    rows = [
        {"id": "ok", "prompt": "a lamp", "model": "gpt-image-1", "quality": "low"},
        {"id": "bad", "prompt": "something forbidden", "model": "gpt-image-1", "quality": "low"},
        {"id": "flaky", "prompt": "batchfail here", "model": "gpt-image-1", "quality": "low"},
    ]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    cfg = config(tmp_path, max_rounds=2)
    result = run_cli(sim, [str(jobs), "--out", str(out), "--batch", "--config", str(cfg), "-q"])
    assert result.exit_code == 1
    m = manifest(out).set_index("job_id")
    assert m.loc["ok", "status"] == "succeeded"
    assert m.loc["bad", "status"] == "rejected"
    assert m.loc["bad", "error_code"] == "moderation_blocked"
    assert m.loc["bad", "error_message"].startswith(
        "Your request was rejected by the safety system"
    )
    # A 5xx line is retried in a new batch, then its failure stands, with the server's words.
    assert m.loc["flaky", "status"] == "failed" and m.loc["flaky", "error_code"] == "server_error"
    assert m.loc["flaky", "attempts"] == 2
    stats = batch_stats(sim)
    assert stats["batches_created"] == 2 and stats["lines_run"] == 4
    assert sim.stats()["images_billed"] == 1

    # --retry-failed sends the failed images again; with retry_lines = "live" a line that
    # fails transiently in the batch goes live (the 5xx word only breaks batch lines), and
    # the succeeded image is left alone.
    cfg = config(tmp_path, retry_lines="live")
    result = run_cli(
        sim, [str(jobs), "--out", str(out), "--batch", "--retry-failed", "--config", str(cfg), "-q"]
    )
    m = manifest(out).set_index("job_id")
    assert m.loc["flaky", "status"] == "succeeded" and m.loc["flaky", "transport"] == "live"
    assert m.loc["ok", "status"] == "succeeded" and m.loc["ok", "transport"] == "batch"
    assert m.loc["bad", "status"] == "rejected"
    assert sim.stats()["images_billed"] == 2


def test_expired_and_cancelled_batches_leave_images_not_run(sim, prefect_api, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.csv", MIXED[:1])
    out = tmp_path / "out"
    sim.configure(batch_hold=True, batch_expire_seconds=0.5)
    result = run_cli(
        sim, [str(jobs), "--out", str(out), "--batch", "--config", str(config(tmp_path)), "-q"]
    )
    assert result.exit_code == 1
    m = manifest(out)
    assert set(m.status) == {"not_run"} and set(m.error_code) == {"batch_expired"}
    assert sim.stats()["images_billed"] == 0
    # Not kept in the journal: the next run submits them again.
    sim.configure(batch_hold=False, batch_expire_seconds=86400)
    result = run_cli(
        sim, [str(jobs), "--out", str(out), "--batch", "--config", str(config(tmp_path)), "-q"]
    )
    assert result.exit_code == 0
    assert batch_stats(sim)["batches_created"] == 2


def test_no_wait_then_status_cancel_and_collect(sim, prefect_api, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.csv", MIXED[:2])
    out = tmp_path / "out"
    cfg = config(tmp_path)
    sim.configure(batch_hold=True)
    result = run_cli(
        sim, [str(jobs), "--out", str(out), "--batch", "--no-wait", "--config", str(cfg)]
    )
    assert result.exit_code == 0, result.output
    assert "rerunning the" in result.output and "imagebatch batch status" in result.output
    m = manifest(out)
    assert set(m.error_code) == {"batch_pending"}

    status = CliRunner().invoke(main, ["batch", "status", str(out)], env=env(sim))
    assert status.exit_code == 0 and "in_progress" in status.output

    cancel = CliRunner().invoke(main, ["batch", "cancel", str(out)], env=env(sim))
    assert cancel.exit_code == 0 and "cancelling" in cancel.output
    result = run_cli(sim, [str(jobs), "--out", str(out), "--batch", "--config", str(cfg), "-q"])
    assert result.exit_code == 1
    assert set(manifest(out).error_code) == {"batch_cancelled"}
    assert batch_stats(sim)["batches_created"] == 1


def test_input_files_split_by_lines_and_by_bytes(sim, prefect_api, tmp_path):
    rows = [
        {
            "id": f"r{i}",
            "prompt": f"object {i} " + "x" * 200,
            "model": "gpt-image-1",
            "quality": "low",
        }
        for i in range(7)
    ]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "lines"
    result = run_cli(
        sim,
        [
            str(jobs),
            "--out",
            str(out),
            "--batch",
            "--config",
            str(config(tmp_path, max_lines=3)),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    parts = [e for e in ledger(out) if e["event"] == "part"]
    assert [p["lines"] for p in parts] == [3, 3, 1]
    assert batch_stats(sim)["batches_created"] == 3
    assert manifest(out).batch_id.nunique() == 3

    out = tmp_path / "bytes"
    result = run_cli(
        sim,
        [
            str(jobs),
            "--out",
            str(out),
            "--batch",
            "--config",
            str(config(tmp_path, max_bytes=1024)),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    parts = [e for e in ledger(out) if e["event"] == "part"]
    assert all(p["bytes"] <= 1024 for p in parts) and sum(p["lines"] for p in parts) == 7
    assert len(parts) >= 3
    assert set(manifest(out).status) == {"succeeded"}


# --------------------------------------------------------------------------- crash windows
def _start(procs, jobs, out, cfg, sim, prefect_api, log) -> subprocess.Popen:
    child_env = {**os.environ, **env(sim), "PREFECT_API_URL": prefect_api}
    with log.open("ab") as f:
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imagebatch.cli",
                "run",
                str(jobs),
                "--out",
                str(out),
                "--batch",
                "--config",
                str(cfg),
                "-q",
            ],
            env=child_env,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
        )
    procs.append(p)
    return p


STAGES = {
    # stage: (simulator knobs while the first run lives, what to wait for before SIGKILL)
    "upload": (
        {"files_upload_delay": 60},
        lambda sim, out: batch_stats(sim)["files_uploaded"] >= 1,
    ),
    "create": (
        {"batch_create_delay": 60},
        lambda sim, out: batch_stats(sim)["batches_created"] >= 1,
    ),
    "wait": (
        {"batch_hold": True},
        lambda sim, out: any(e["event"] == "created" for e in ledger(out)),
    ),
    "download": (
        {"files_content_chunk_delay": 60},
        lambda sim, out: (
            sim.stats()["batch"]["by_status"].get("completed", 0) >= 1
            and (out / "batch").exists()
            and any(p.name.startswith(".tmp-") for p in (out / "batch").iterdir())
        ),
    ),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_at_each_stage_then_rerun_completes_without_a_second_batch(
    stage, sim, procs, prefect_api, tmp_path
):
    knobs, ready = STAGES[stage]
    rows = MIXED[:2]
    requested = sum(r["n"] for r in rows)
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    log = tmp_path / "cli.log"
    cfg = config(tmp_path)
    sim.configure(knobs)
    p = _start(procs, jobs, out, cfg, sim, prefect_api, log)
    wait_for(lambda: ready(sim, out), 120, f"the {stage} stage", p, log)
    p.send_signal(signal.SIGKILL)
    assert p.wait(10) == -signal.SIGKILL
    sim.configure({k: (False if v is True else 0) for k, v in knobs.items()})

    p = _start(procs, jobs, out, cfg, sim, prefect_api, log)
    assert p.wait(180) == 0, log.read_text()[-3000:]
    m = manifest(out)
    assert len(m) == requested and set(m.status) == {"succeeded"}
    assert m.batch_id.nunique() == 1
    assert_files_verify(out, m)
    stats = batch_stats(sim)
    assert stats["batches_created"] == 1, stats  # never a second batch
    assert sim.stats()["images_billed"] == requested  # never paid twice
    journal = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines() if x]
    assert len([r for r in journal if r["status"] == "succeeded"]) == requested
    # Input, output and temp files under batch/ are ours and are gone once collected.
    assert not any((out / "batch").iterdir())


@pytest.mark.parametrize("when", ["before", "after"])
def test_sigkill_around_a_collected_images_rename_is_finished_without_paying_again(
    when, sim, prefect_api, tmp_path
):
    """Collection journals an image before renaming it into images/, as a live run does: a
    kill on either side of the rename leaves every file there named by the journal, and the
    rerun finishes the move, collects the rest from the same batch and pays nothing again."""
    rows = MIXED[:2]
    requested = sum(r["n"] for r in rows)
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    cfg = config(tmp_path)
    args = ["run", str(jobs), "--out", str(out), "--batch", "--config", str(cfg), "-q"]
    child_env = {**os.environ, **env(sim), "PREFECT_API_URL": prefect_api}
    child_env.update(KILL_AT="3")
    p = subprocess.run(
        [sys.executable, "-c", kill_at_commit(when), *args],
        env=child_env,
        cwd=ROOT,
        timeout=180,
        capture_output=True,
    )
    assert p.returncode == -signal.SIGKILL, p.stdout.decode()[-2000:] + p.stderr.decode()[-2000:]
    lines = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines() if x]
    assert lines and {r["status"] for r in lines} == {"succeeded"}
    # Lines of concurrent lines' images may be journaled ahead of their renames; whatever is
    # under images/ has its line, and whatever has a line but is not there yet is staged.
    on_disk = {f"images/{f.name}" for f in (out / "images").iterdir()}
    assert on_disk <= {r["file"] for r in lines}, "renamed into images/ before its journal line"
    staged = [r for r in lines if not (out / r["file"]).exists()]
    assert all((out / r["moved_from"]).is_file() for r in staged)
    if when == "before":
        assert staged  # the window, for real: journaled, not yet renamed
    else:
        assert len(on_disk) >= 3
    billed = sim.stats()["images_billed"]
    assert billed == requested  # the batch ran every line before collection began

    result = run_cli(sim, args[1:])
    assert result.exit_code == 0, result.output
    m = manifest(out)
    assert len(m) == requested and set(m.status) == {"succeeded"}
    assert_files_verify(out, m)
    assert {f"images/{f.name}" for f in (out / "images").iterdir()} == set(m.file)
    assert batch_stats(sim)["batches_created"] == 1  # collected again, never submitted again
    assert sim.stats()["images_billed"] == billed  # nothing paid twice
    journal = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines() if x]
    succeeded = [r["key"] for r in journal if r["status"] == "succeeded"]
    assert sorted(succeeded) == sorted(m.key)  # each image journaled once: never stored twice
    assert not any((out / ".imagebatch-tmp").iterdir())


def test_killed_after_collecting_but_before_recording_it_collects_again_without_duplicates(
    sim, prefect_api, tmp_path
):
    """The last window: every image journaled, the ledger's `collected` line not yet written
    (simulated by cutting it off). The rerun downloads the batch's files again and finds
    every image already done: nothing stored twice, nothing submitted or billed again."""
    jobs = write_jobs(tmp_path / "jobs.csv", MIXED[:2])
    out = tmp_path / "out"
    cfg = config(tmp_path)
    assert (
        run_cli(
            sim, [str(jobs), "--out", str(out), "--batch", "--config", str(cfg), "-q"]
        ).exit_code
        == 0
    )
    events = (out / "batches.jsonl").read_text().splitlines()
    assert json.loads(events[-1])["event"] == "collected"
    (out / "batches.jsonl").write_text("\n".join(events[:-1]) + "\n")
    journal_before = (out / "journal.jsonl").read_text()

    result = run_cli(sim, [str(jobs), "--out", str(out), "--batch", "--config", str(cfg), "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "journal.jsonl").read_text() == journal_before
    assert json.loads((out / "batches.jsonl").read_text().splitlines()[-1])["event"] == "collected"
    assert batch_stats(sim)["batches_created"] == 1
    assert sim.stats()["images_billed"] == 15
    assert set(manifest(out).status) == {"succeeded"}


def test_python_api_and_dry_run_know_batch_mode(sim, prefect_api, tmp_path, monkeypatch):
    import imagebatch

    for name, value in env(sim).items():
        monkeypatch.setenv(name, value)
    frame = pd.DataFrame(MIXED[:1])
    m = imagebatch.run(frame, out=tmp_path / "out", mode="batch", poll_seconds=0.05)
    assert set(m.status) == {"succeeded"} and set(m.transport) == {"batch"}
    assert m.attrs["imagebatch"]["exit_code"] == 0

    live = imagebatch.api.estimate(frame).plan
    batch = imagebatch.api.estimate(frame, mode="batch").plan
    assert live.usd > 0 and batch.usd == live.usd / 2  # the price book's batch discount


def test_batch_against_azure_is_refused_before_anything_is_sent(prefect_api, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.csv", MIXED[:1])
    azure = {"OPENAI_BASE_URL": "https://res.openai.azure.com", "OPENAI_API_KEY": KEY}
    result = CliRunner().invoke(
        main, ["run", str(jobs), "--out", str(tmp_path / "out"), "--batch", "-q"], env=azure
    )
    assert result.exit_code == 2
    assert "--batch is not supported against Azure OpenAI" in result.output
    assert not (tmp_path / "out" / "batches.jsonl").exists()


def test_batch_images_cost_half_and_the_cap_counts_batch_prices(sim, prefect_api, tmp_path):
    rows = [
        {"id": f"r{i}", "prompt": "a lamp", "model": "gpt-image-2", "quality": "low"}
        for i in range(3)
    ]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    cfg = config(tmp_path)
    live = run_cli(sim, [str(jobs), "--out", str(tmp_path / "live"), "-q"])
    assert live.exit_code == 0, live.output
    batch = run_cli(
        sim, [str(jobs), "--out", str(tmp_path / "batch"), "--batch", "--config", str(cfg), "-q"]
    )
    assert batch.exit_code == 0, batch.output
    live_cost = manifest(tmp_path / "live").cost_usd
    batch_cost = manifest(tmp_path / "batch").cost_usd
    assert live_cost.notna().all() and (live_cost > 0).all()
    assert list(batch_cost) == pytest.approx(list(live_cost / 2))

    # The cap books each line's worst case at the batch price before submitting it:
    # room for two lines, not three.
    from decimal import Decimal

    from imagebatch.configs.prices import PriceBook
    from imagebatch.configs.registry import Registry
    from imagebatch.configs.settings import JobDefaults
    from imagebatch.tasks.cost import estimate_unit
    from imagebatch.tasks.plan import plan_jobs, units_for
    from imagebatch.tasks.read_jobs import read_jobs
    from imagebatch.tasks.validate import Validator

    checked = Validator(Registry.load(), JobDefaults(), targets_openai=False).check(
        read_jobs(pd.DataFrame(rows[:1]))
    )
    [unit] = units_for(plan_jobs(checked.valid)[0], [0])
    worst = estimate_unit(PriceBook.load(), unit.planned.job, 1, batch=True).worst_usd
    cap = worst * Decimal("2.5")
    live_worst = estimate_unit(PriceBook.load(), unit.planned.job, 1).worst_usd
    assert cap < 2 * live_worst  # at live prices, two lines would not fit
    out = tmp_path / "capped"
    result = run_cli(
        sim,
        [
            str(jobs),
            "--out",
            str(out),
            "--batch",
            "--max-cost",
            str(cap),
            "--config",
            str(cfg),
            "-q",
        ],
    )
    assert result.exit_code == 1, result.output
    m = manifest(out)
    assert list(m.status) == ["succeeded", "succeeded", "not_run"]
    assert m.error_code.iloc[2] == "cost_cap"
    assert [e["lines"] for e in ledger(out) if e["event"] == "part"] == [2]
