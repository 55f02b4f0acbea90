"""Failures a real server produces, end to end through the CLI and the notebook API."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

import imagebatch
from imagebatch.cli import main
from imagebatch.simulator import SimConfig, SimulatorServer

KEY = "sk-faults-test-0123456789"


@pytest.fixture
def sim():
    with SimulatorServer(SimConfig(latency=0.01, seed=3)) as server:
        yield server


def run(sim, jobs, out, *flags):
    env = {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": KEY}
    return CliRunner().invoke(
        main, ["run", str(jobs), "--out", str(out), "-q", *flags], env=env, catch_exceptions=False
    )


def jobs_csv(tmp_path, count: int, model: str = "gpt-image-2"):
    path = tmp_path / "jobs.csv"
    pd.DataFrame({"prompt": [f"thing {i}" for i in range(count)], "model": model}).to_csv(
        path, index=False
    )
    return path


def test_dropped_connections_are_ambiguous_retried_and_counted(prefect_api, sim, tmp_path):
    sim.configure(drop_rate=0.3)
    result = run(sim, jobs_csv(tmp_path, 20), tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert (manifest.status == "succeeded").all()
    ambiguous = int(manifest.ambiguous_retries.sum())
    assert ambiguous > 0
    assert "may have been paid twice" in result.output
    # every dropped request was billed by the server: the manifest's count is exactly the overpay
    assert sim.stats()["images_billed"] == 20 + ambiguous


def test_ambiguous_policy_fail_does_not_retry(prefect_api, sim, tmp_path):
    sim.configure(drop_rate=0.5)
    result = run(sim, jobs_csv(tmp_path, 12), tmp_path / "out", "--on-ambiguous", "fail")
    assert result.exit_code == 1
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    failed = manifest[manifest.status == "failed"]
    assert len(failed) > 0 and set(failed.error_code) <= {"remote_protocol_error", "read_error"}
    assert sim.stats()["requests_seen"] == 12


def test_stall_past_the_read_timeout_is_ambiguous(prefect_api, sim, tmp_path):
    sim.configure(stall_rate=1.0, stall_seconds=30)
    result = run(
        sim,
        jobs_csv(tmp_path, 2),
        tmp_path / "out",
        "--read-timeout",
        "0.5",
        "--on-ambiguous",
        "fail",
    )
    assert result.exit_code == 1
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert manifest.error_code.tolist() == ["read_timeout", "read_timeout"]


def test_malformed_answers_are_retried_like_server_errors(prefect_api, sim, tmp_path):
    sim.configure(malformed_rate=0.4)
    result = run(sim, jobs_csv(tmp_path, 15), tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert (manifest.status == "succeeded").all() and manifest.attempts.max() > 1


def test_rate_limits_pause_and_every_image_arrives(prefect_api, sim, tmp_path):
    """429s really happen and are survived. The server sends no x-ratelimit-* headers and
    allows 4 requests a second, while the client is told 600 a minute: it cannot pace below
    the limit. The server holds the first requests until 8 are in flight, then admits them at
    once, so at least 4 of those are refused whatever the timing. Refused requests are not
    billed, are retried after the server's retry-after, and every image arrives once."""
    sim.configure(rpm=4, window_seconds=1.0, ratelimit_headers=False, hold_until_in_flight=8)
    flags = ("--rpm", "600", "--ipm", "600", "--max-in-flight", "8")
    result = run(sim, jobs_csv(tmp_path, 24), tmp_path / "out", *flags)
    assert result.exit_code == 0, result.output
    stats = sim.stats()
    assert stats["rate_limited"] >= 4 and stats["status"]["429"] == stats["rate_limited"]
    assert stats["images_billed"] == 24 and stats["requests_ok"] == 24
    m = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert (m.status == "succeeded").all() and len(m) == 24
    # the run reports every refusal it met
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["stats"]["rate_limited"] == stats["rate_limited"]


def test_notebook_api_takes_a_dataframe(prefect_api, sim, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    df = pd.DataFrame(
        {
            "prompt": ["a lighthouse", "a harbour", ""],
            "model": ["gpt-image-2", "dall-e-3", "gpt-image-2"],
            "n": [2, 2, 1],
            "sku": ["L-1", "H-1", "E-1"],
        }
    )
    manifest = imagebatch.run(df, out=tmp_path / "out", quality=None)
    assert manifest.attrs["imagebatch"]["exit_code"] == 1
    assert manifest.attrs["imagebatch"]["counts"]["succeeded"] == 4
    assert manifest.status.tolist() == ["succeeded"] * 4 + ["invalid"]
    assert manifest.sku.tolist() == ["L-1", "L-1", "H-1", "H-1", "E-1"]
    assert "prompt is empty" in manifest.error_message.iloc[-1]
    assert [p.column for p in imagebatch.validate(df).problems if p.severity == "error"] == [
        "prompt"
    ]


def test_retries_after_a_2xx_are_counted_as_possibly_paid_twice(prefect_api, sim, tmp_path):
    # The simulator bills a malformed 200, exactly as a real server would bill the image
    # it failed to deliver; the retry pays again. The manifest must say so, per image.
    sim.configure(malformed_rate=0.4)
    result = run(sim, jobs_csv(tmp_path, 15), tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    counted = int(manifest.ambiguous_retries.sum())
    assert counted > 0 and "may have been paid twice" in result.output
    assert sim.stats()["images_billed"] == 15 + counted


def test_lost_requests_not_retried_are_not_counted_as_paid_twice(prefect_api, sim, tmp_path):
    sim.configure(drop_rate=0.5)
    result = run(sim, jobs_csv(tmp_path, 12), tmp_path / "out", "--on-ambiguous", "fail")
    assert result.exit_code == 1
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert (manifest.status == "failed").any()
    assert int(manifest.ambiguous_retries.sum()) == 0
    assert "paid twice" not in result.output
