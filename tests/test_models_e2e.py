"""Issue 8 end to end: CLI -> Prefect flow -> real simulator on loopback, as a user runs it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from imagebatch.cli import main
from imagebatch.configs.registry import Registry
from imagebatch.configs.settings import ApiSettings, JobDefaults
from imagebatch.simulator import SimConfig, SimulatorServer
from imagebatch.tasks.api_client import ImagesClient
from imagebatch.tasks.errors import RateLimited
from imagebatch.tasks.plan import plan_jobs, units_for
from imagebatch.tasks.read_jobs import read_jobs
from imagebatch.tasks.validate import Validator

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-e2e-models-0123456789abcdef"
MUG = ROOT / "data" / "sources" / "mug.png"


@pytest.fixture(scope="module")
def sim():
    with SimulatorServer(SimConfig(latency=0.01, api_key=KEY)) as server:
        yield server


@pytest.fixture
def fresh(sim):
    sim.reset()
    sim.configure(**SimConfig(latency=0.01, api_key=KEY).to_dict(redact=False))
    return sim


def run(tmp_path: Path, rows: list[dict], *args: str, env: dict[str, str] | None = None):
    jobs = tmp_path / "jobs.csv"
    pd.DataFrame(rows).to_csv(jobs, index=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["run", str(jobs), "--out", str(out), "-q", *args], env=env, catch_exceptions=False
    )
    manifest = pd.read_csv(out / "manifest.csv") if (out / "manifest.csv").exists() else None
    return result, manifest, out


def env_for(sim) -> dict[str, str]:
    return {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": KEY}


def test_current_snapshot_and_unknown_models_run_and_a_missing_model_fails_alone(
    prefect_api, fresh, tmp_path
):
    rows = [
        {"id": "new-1", "prompt": "a lighthouse", "model": "gpt-image-9", "n": 2},
        {"id": "new-2", "prompt": "a harbour", "model": "gpt-image-9", "quality": "xhigh"},
        {"id": "snap", "prompt": "a boat", "model": "gpt-image-2-2026-04-21", "size": "1280x720"},
        {"id": "flare", "prompt": "a gull", "model": "gpt-image-2.5-flare", "quality": "xhigh"},
        {
            "id": "edit",
            "prompt": "a hat on the mug",
            "model": "gpt-image-2.5-sunburst",
            "operation": "edit",
            "image": "mug.png",
            "moderation": "low",
        },
        {
            "id": "new-edit",
            "prompt": "a scarf on the mug",
            "model": "gpt-image-9",
            "operation": "edit",
            "image": "mug.png",
        },
        {"id": "gone-1", "prompt": "a fox", "model": "flux-pro", "n": 2},
        {"id": "gone-2", "prompt": "a cat", "model": "flux-pro"},
    ]
    (tmp_path / "mug.png").write_bytes(MUG.read_bytes())
    result, manifest, _ = run(tmp_path, rows, env=env_for(fresh))
    assert result.exit_code == 1, result.output  # some images failed; the run did not stop
    assert "stopped early" not in result.output
    by_id = manifest.groupby("job_id").status.apply(set).to_dict()
    assert by_id == {
        "new-1": {"succeeded"},
        "new-2": {"succeeded"},
        "snap": {"succeeded"},
        "flare": {"succeeded"},
        "edit": {"succeeded"},
        "new-edit": {"succeeded"},
        "gone-1": {"failed"},
        "gone-2": {"failed"},
    }
    # the exact names sent are the names recorded
    assert set(manifest.model) >= {"gpt-image-9", "gpt-image-2-2026-04-21"}
    gone = manifest[manifest.model == "flux-pro"]
    assert (gone.error_code == "model_not_found").all()
    assert gone.error_message.str.contains("flux-pro").all()
    # one warning per unknown model, naming its rows and how to add it
    text = " ".join(result.output.split())
    assert text.count("'gpt-image-9' is not in the model registry") == 1
    assert "3 row(s) (1, 2, 6)" in text
    assert text.count("'flux-pro' is not in the model registry") == 1
    assert "moderation" in text and "not sent" in text  # dropped from the edit form
    stats = fresh.stats()
    assert stats["per_model"]["gpt-image-9"]["images"] == 4  # unchecked: one image per call
    assert stats["per_model"]["gpt-image-9"]["requests"] == 4


def test_strict_models_refuses_unknown_models(prefect_api, fresh, tmp_path):
    rows = [
        {"prompt": "a lighthouse", "model": "gpt-image-9"},
        {"prompt": "a boat", "model": "gpt-image-2.5-flare-2026-09-08"},
    ]
    result, manifest, _ = run(tmp_path, rows, "--strict-models", env=env_for(fresh))
    assert result.exit_code == 1
    assert manifest.status.tolist() == ["invalid", "succeeded"]
    assert "row 1, column 'model'" in result.output and "strict_models" in result.output
    config = tmp_path / "strict.toml"
    config.write_text("[registry]\nstrict_models = true\n", encoding="utf-8")
    result = CliRunner().invoke(
        main, ["validate", str(tmp_path / "jobs.csv"), "--config", str(config)], env=env_for(fresh)
    )
    assert result.exit_code == 1 and "strict_models" in result.output


def test_a_user_overlay_adds_a_model_with_its_own_rules(prefect_api, tmp_path):
    overlay = tmp_path / "mine.toml"
    overlay.write_text(
        """
[models."acme-pix-1"]
endpoints = ["generate"]
max_n_per_call = 2
sizes = ["640x480"]
qualities = ["draft", "final"]
params = ["output_format"]
response_format = "b64_json"
prompt_max = 200
default_size = "640x480"
default_quality = "draft"
usage = true
""",
        encoding="utf-8",
    )
    registry = Registry.load(overlay)
    with SimulatorServer(SimConfig(latency=0.0), registry=registry) as server:
        rows = [
            {"id": "ok", "prompt": "a kite", "model": "acme-pix-1", "quality": "final", "n": 3},
            {"id": "bad", "prompt": "a kite", "model": "acme-pix-1", "size": "1024x1024"},
        ]
        env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": KEY}
        result, manifest, _ = run(tmp_path, rows, "--models", str(overlay), env=env)
        assert result.exit_code == 1, result.output
        assert manifest.groupby("job_id").status.apply(set).to_dict() == {
            "ok": {"succeeded"},
            "bad": {"invalid"},
        }
        assert "offers sizes 640x480" in result.output
        assert "not in the model registry" not in result.output
        assert server.stats()["per_model"]["acme-pix-1"]["requests"] == 2  # 3 images, 2 per call
        ok = manifest[manifest.job_id == "ok"]
        assert set(ok.width) == {640} and set(ok.quality) == {"final"}


def test_billing_hard_limit_stops_the_run_without_retrying(prefect_api, fresh, tmp_path):
    fresh.configure(quota_images=1, quota_error="billing_hard_limit_reached")
    rows = [{"id": f"r{i}", "prompt": f"p{i}", "model": "gpt-image-2"} for i in range(6)]
    result, manifest, _ = run(tmp_path, rows, "--max-in-flight", "1", env=env_for(fresh))
    assert result.exit_code == 2, result.output
    assert "billing_hard_limit_reached" in result.output
    counts = manifest.status.value_counts().to_dict()
    assert counts.get("succeeded") == 1 and counts.get("failed") == 1
    assert counts.get("not_run") == 4
    failed = manifest[manifest.status == "failed"]
    assert failed.attempts.tolist() == [1]


def test_request_too_large_fails_alone_and_does_not_pause_the_run(prefect_api, fresh, tmp_path):
    fresh.configure(ipm=2)
    rows = [
        {"id": "big", "prompt": "three at once", "model": "gpt-image-2", "n": 3},
        {"id": "small", "prompt": "one", "model": "gpt-image-2"},
    ]
    result, manifest, out = run(tmp_path, rows, env=env_for(fresh))
    assert result.exit_code == 1, result.output
    big = manifest[manifest.job_id == "big"]
    assert (big.status == "failed").all() and (big.attempts == 1).all()
    assert big.error_message.str.contains("Request too large").all()
    assert manifest[manifest.job_id == "small"].status.tolist() == ["succeeded"]
    stats = json.loads((out / "run.json").read_text())["stats"]
    assert stats.get("rate_limited", 0) == 0 and stats["limiter"]["pauses"] == 0


def test_429_without_retry_after_takes_its_wait_from_the_message(fresh):
    """The client against the simulator: the header "may be omitted", the message then says
    how long to wait, and that is the hint the retry policy and the limiter use."""
    fresh.configure(ipm=1, omit_retry_after_rate=1.0)
    api = ApiSettings(base_url=fresh.base_url, api_key=KEY)
    checked = Validator(Registry.load(), JobDefaults(), targets_openai=False).check(
        read_jobs(pd.DataFrame([{"prompt": "a"}, {"prompt": "b"}]))
    )
    first, second = [u for p in plan_jobs(checked.valid) for u in units_for(p, [0])]

    async def go():
        async with ImagesClient(api) as client:
            await client.send(first)
            with pytest.raises(RateLimited) as err:
                await client.send(second)
            return err.value

    error = asyncio.run(go())
    assert error.headers is not None and "retry-after" not in error.headers
    assert "try again in" in error.message
    assert error.retry_after is not None and 0 < error.retry_after <= 60


def test_refusal_through_a_litellm_proxy_is_rejected(prefect_api, fresh, tmp_path):
    fresh.configure(error_style="litellm")
    rows = [
        {"id": "no", "prompt": "a forbidden thing", "model": "gpt-image-2", "n": 2},
        {"id": "yes", "prompt": "a kind thing", "model": "gpt-image-2"},
    ]
    result, manifest, _ = run(tmp_path, rows, env=env_for(fresh))
    assert result.exit_code == 1
    refused = manifest[manifest.job_id == "no"]
    assert refused.status.tolist() == ["rejected", "rejected"]
    assert refused.error_message.str.contains("safety system").all()
    assert (refused.attempts == 1).all()
    assert fresh.stats()["moderated"] == 1  # not retried


def test_fastapi_error_is_one_line_without_the_prompt(prefect_api, fresh, tmp_path):
    fresh.configure(error_style="fastapi")
    prompt = "an unusually specific and confidential product description " * 20
    rows = [{"prompt": prompt, "model": "gpt-image-9", "quality": "ultra"}]
    result, manifest, _ = run(tmp_path, rows, env=env_for(fresh))
    assert result.exit_code == 1
    row = manifest.iloc[0]
    assert row.status == "failed" and str(row.error_code) == "http_422"
    assert row.error_message.startswith("body.quality: ")
    assert "confidential" not in row.error_message and "\n" not in row.error_message


def test_azure_mode_sends_api_key_to_deployment_paths(prefect_api, fresh, tmp_path):
    config = tmp_path / "azure.toml"
    config.write_text(
        f"""
[api]
base_url = "{fresh.url}"
api_type = "azure"
api_version = "2025-04-01-preview"

[api.deployments]
"gpt-image-2" = "img-prod"
""",
        encoding="utf-8",
    )
    rows = [
        {"id": "a", "prompt": "a", "model": "gpt-image-2"},
        {"id": "b", "prompt": "b", "model": "gpt-image-2.5-flare", "deployment": "canary"},
        {"id": "c", "prompt": "c", "model": "gpt-image-2.5-sunburst"},
    ]
    result, _, _ = run(tmp_path, rows, "--config", str(config), env={"OPENAI_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert fresh.stats()["azure_deployments"] == {
        "img-prod": 1,
        "canary": 1,
        "gpt-image-2.5-sunburst": 1,
    }
    # the same server refuses Bearer on its Azure paths: a mix-up would stop the run
    config.write_text(config.read_text().replace('api_type = "azure"', 'api_type = "openai"'))
    result, _, _ = run(
        tmp_path, rows, "--config", str(config), "--force", env={"OPENAI_API_KEY": KEY}
    )
    assert result.exit_code == 2


def test_a_429_that_is_not_a_rate_limit_is_retried_without_pausing_the_run(
    prefect_api, fresh, tmp_path
):
    # seed 0, rate 0.3: of the first 20 requests only the 7th (an overload 429) and the 17th
    # draw a fault, so 8 jobs meet exactly one 429 whatever order their requests arrive in
    fresh.configure(error_rate=0.3, overload_status=429, seed=0)
    rows = [{"id": f"r{i}", "prompt": f"p{i}", "model": "gpt-image-2"} for i in range(8)]
    result, _, out = run(tmp_path, rows, env=env_for(fresh))
    assert result.exit_code == 0, result.output
    sim_stats = fresh.stats()
    assert sim_stats["status"]["429"] == 1 and sim_stats["requests_seen"] == 9
    stats = json.loads((out / "run.json").read_text())["stats"]
    assert stats.get("rate_limited", 0) == 0 and stats["limiter"]["pauses"] == 0
    assert stats["retries"] == 1
