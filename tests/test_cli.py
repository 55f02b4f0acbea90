"""The CLI end to end, as a user drives it: real simulator on loopback, real Prefect API."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from click.testing import CliRunner
from helpers import write_jobs

from imagebatch.cli import main
from imagebatch.tasks.manifest import COLUMNS

ROOT = Path(__file__).resolve().parent.parent

SECRET = "sk-test-SECRET-do-not-leak-0123456789"


def invoke(args: list[str], env: dict[str, str] | None = None):
    runner = CliRunner()
    return runner.invoke(main, args, env=env or {}, catch_exceptions=False)


def api_env(sim, key: str = SECRET) -> dict[str, str]:
    return {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": key}


def all_text(folder: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file()
    )


def test_example_catalog_with_builtin_simulator(prefect_api, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        ["run", str(ROOT / "data" / "catalog.csv"), "--out", str(out), "--quiet", "--simulate"]
    )
    assert result.exit_code == 1, result.output  # one invalid row, the rest succeed
    assert "built-in simulator" in result.output
    assert "row 11, column 'size'" in result.output
    # xhigh has no price factor yet: its image is priced from usage but had no estimate
    assert "the 20 image(s) made with an estimate cost $" in result.output
    assert "1 image(s) made had no estimate" in result.output
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest.columns[: len(COLUMNS)]) == COLUMNS
    assert "sku" in manifest.columns
    statuses = manifest.groupby("status").size().to_dict()
    assert statuses == {"succeeded": 21, "invalid": 1}
    assert manifest.loc[manifest.status == "invalid", "sku"].tolist() == ["CAT-011"]
    dalle = manifest[(manifest.model == "dall-e-3") & (manifest.status == "succeeded")]
    assert len(dalle) == 6 and dalle.revised_prompt.notna().all()
    assert manifest[manifest.model == "gpt-image-2"].revised_prompt.isna().all()
    for row in manifest[manifest.status == "succeeded"].itertuples():
        assert (out / row.file).is_file()
    # dall-e-3 with n=3 was three parallel single-image calls
    flamingo = manifest[(manifest.sku == "CAT-003")]
    assert sorted(flamingo.image_index) == [0, 1, 2] and flamingo.request_id.nunique() == 3
    parquet = pd.read_parquet(out / "manifest.parquet")
    assert len(parquet) == len(manifest) and list(parquet.columns) == list(manifest.columns)
    run = json.loads((out / "run.json").read_text())
    assert run["simulator"] is True
    assert run["counts"]["succeeded"] == 21
    # the current models run, xhigh included, and keep their names in the manifest
    current = manifest[manifest.model.str.startswith("gpt-image-2.5")]
    assert sorted(current.sku) == ["CAT-013", "CAT-014"] and (current.status == "succeeded").all()
    assert current.loc[current.sku == "CAT-013", "quality"].tolist() == ["xhigh"]


def test_key_never_written_or_printed(prefect_api, fresh_sim, tmp_path):
    jobs = write_jobs(
        tmp_path / "jobs.csv",
        [
            {"prompt": "a cat", "model": "gpt-image-2"},
            {"prompt": "forbidden thing", "model": "gpt-image-2"},
        ],
    )
    out = tmp_path / "out"
    result = invoke(["run", str(jobs), "--out", str(out)], env=api_env(fresh_sim))
    assert result.exit_code == 1
    assert SECRET not in result.output
    assert SECRET not in all_text(out)
    assert "SECRET" not in all_text(out)


def test_moderation_refusal_is_rejected_and_not_retried(prefect_api, fresh_sim, tmp_path):
    jobs = write_jobs(
        tmp_path / "jobs.csv", [{"prompt": "a forbidden picture", "model": "gpt-image-2", "n": 2}]
    )
    result = invoke(
        ["run", str(jobs), "--out", str(tmp_path / "out"), "-q"], env=api_env(fresh_sim)
    )
    assert result.exit_code == 1
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert manifest.status.tolist() == ["rejected", "rejected"]
    assert manifest.error_code.tolist() == ["moderation_blocked"] * 2
    assert fresh_sim.stats()["requests_seen"] == 1


def test_transient_errors_are_retried_until_success(prefect_api, fresh_sim, tmp_path):
    fresh_sim.configure(error_rate=0.3, seed=7)
    rows = [{"prompt": f"item {i}", "model": "gpt-image-2"} for i in range(30)]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    result = invoke(
        ["run", str(jobs), "--out", str(tmp_path / "out"), "-q"], env=api_env(fresh_sim)
    )
    assert result.exit_code == 0, result.output
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert (manifest.status == "succeeded").all()
    stats = fresh_sim.stats()
    assert stats["images_billed"] == 30  # 5xx are not billed, so retries cost nothing extra
    assert stats["requests_seen"] > 30 and manifest.attempts.max() > 1


def test_fatal_error_stops_the_run_quickly(prefect_api, fresh_sim, tmp_path):
    fresh_sim.configure(api_key="sk-the-right-one")
    rows = [{"prompt": f"item {i}", "model": "gpt-image-2"} for i in range(40)]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    result = invoke(
        ["run", str(jobs), "--out", str(tmp_path / "out"), "-q", "--max-in-flight", "2"],
        env=api_env(fresh_sim),
    )
    assert result.exit_code == 2
    assert "stopped early" in result.output and "invalid_api_key" in result.output
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert (manifest.status == "not_run").sum() >= 30
    assert fresh_sim.stats()["requests_seen"] <= 4


def test_insufficient_quota_is_fatal_not_a_rate_limit(prefect_api, fresh_sim, tmp_path):
    fresh_sim.configure(quota_images=3)
    rows = [{"prompt": f"item {i}", "model": "gpt-image-2"} for i in range(20)]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    result = invoke(
        ["run", str(jobs), "--out", str(tmp_path / "out"), "-q", "--max-in-flight", "1"],
        env=api_env(fresh_sim),
    )
    assert result.exit_code == 2
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    counts = manifest.status.value_counts().to_dict()
    assert counts["succeeded"] == 3 and counts["failed"] == 1 and counts["not_run"] == 16
    assert manifest.loc[manifest.status == "failed", "error_code"].tolist() == [
        "insufficient_quota"
    ]


def test_model_the_server_does_not_serve_fails_only_its_rows(prefect_api, fresh_sim, tmp_path):
    models = tmp_path / "models.toml"
    models.write_text(
        '[models."my-model"]\nendpoints = ["generate"]\nsizes = ["1024x1024"]\nqualities = ["auto"]\nprompt_max = 100\n'
    )
    rows = [{"prompt": f"x{i}", "model": "my-model"} for i in range(5)]
    jobs = write_jobs(tmp_path / "jobs.csv", [*rows, {"prompt": "y", "model": "gpt-image-2"}])
    out = tmp_path / "out"
    result = invoke(
        [
            "run",
            str(jobs),
            "--out",
            str(out),
            "-q",
            "--models",
            str(models),
            "--max-in-flight",
            "1",
        ],
        env=api_env(fresh_sim),
    )
    assert result.exit_code == 1, result.output  # not stopped: the other model ran
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    mine = manifest[manifest.model == "my-model"]
    assert (mine.status == "failed").all() and (mine.error_code == "model_not_found").all()
    assert mine.error_message.str.contains("my-model").all()  # the server's words
    assert manifest[manifest.model == "gpt-image-2"].status.tolist() == ["succeeded"]
    # once the server said so, the model's other rows were not sent
    assert fresh_sim.stats()["requests_seen"] == 2
    assert sorted(mine.attempts.tolist()) == [0, 0, 0, 0, 1]


def test_rerun_requests_nothing_and_keeps_the_manifest(prefect_api, fresh_sim, tmp_path):
    rows = [{"prompt": f"item {i}", "model": "dall-e-3", "n": 2} for i in range(5)]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    assert (
        invoke(["run", str(jobs), "--out", str(out), "-q"], env=api_env(fresh_sim)).exit_code == 0
    )
    first = pd.read_csv(out / "manifest.csv")
    fresh_sim.reset()
    result = invoke(["run", str(jobs), "--out", str(out), "-q"], env=api_env(fresh_sim))
    assert result.exit_code == 0
    assert "10 image(s) already done" in result.output
    assert fresh_sim.stats()["requests_seen"] == 0
    second = pd.read_csv(out / "manifest.csv")
    pd.testing.assert_frame_equal(first, second)


def test_validate_command(tmp_path):
    good = write_jobs(tmp_path / "good.csv", [{"prompt": "x", "model": "gpt-image-2"}])
    bad = write_jobs(
        tmp_path / "bad.csv",
        [
            {"prompt": "x", "model": "gpt-image-2", "size": "7x7"},
            {"prompt": "y", "model": "gpt-image-2"},
        ],
    )
    assert invoke(["validate", str(good)]).exit_code == 0
    result = invoke(["validate", str(bad)])
    assert result.exit_code == 1
    assert "row 1, column 'size'" in result.output and "2 rows: 1 valid, 1 invalid" in result.output
    assert invoke(["validate", str(tmp_path / "missing.csv")]).exit_code == 2


def test_validate_retired_model_depends_on_the_target_not_on_today(tmp_path):
    # Fixed dates far from any day this test runs on: the registry's real retirement dates
    # would make the outcome depend on the calendar.
    models = tmp_path / "models.toml"
    models.write_text(
        '[models."old-model"]\nendpoints = ["generate"]\nsizes = ["1024x1024"]\n'
        'qualities = ["standard"]\nprompt_max = 100\nretired = "2001-01-01"\n'
        'default_size = "1024x1024"\ndefault_quality = "standard"\n'
    )
    retired = write_jobs(tmp_path / "retired.csv", [{"prompt": "x", "model": "old-model"}])
    args = ["validate", str(retired), "--models", str(models)]
    # a run against api.openai.com refuses it; a simulated or other-server run only warns
    result = invoke(args, env={"OPENAI_API_KEY": "sk-x"})
    assert result.exit_code == 1 and "retired on api.openai.com" in result.output
    assert invoke(args).exit_code == 1
    assert invoke([*args, "--simulate"]).exit_code == 0
    assert invoke(args, env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}).exit_code == 0


def test_usage_errors_exit_2(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.csv", [{"prompt": "x"}])
    sim = ["--simulate"]
    result = invoke(["run", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"), *sim])
    assert result.exit_code == 2 and "nope.csv" in result.output
    result = invoke(
        ["run", str(jobs), "--tier", "no-such-tier", "--out", str(tmp_path / "o"), *sim]
    )
    assert result.exit_code == 2 and "no-such-tier" in result.output
    blocked = tmp_path / "file"
    blocked.write_text("x")
    result = invoke(["run", str(jobs), "--out", str(blocked / "sub"), *sim])
    assert result.exit_code == 2 and "output folder" in result.output


def test_no_key_no_base_url_and_no_opt_in_is_refused(tmp_path):
    """A scheduled run whose key went missing must not "succeed" with synthetic images."""
    jobs = write_jobs(tmp_path / "jobs.csv", [{"prompt": "x"}])
    out = tmp_path / "out"
    result = invoke(["run", str(jobs), "--out", str(out), "-q"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--simulate" in lines[0] and "OPENAI_API_KEY" in lines[0]
    assert not out.exists()


def test_simulate_config_setting_opts_in(prefect_api, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.csv", [{"prompt": "x", "model": "gpt-image-2"}])
    config = tmp_path / "imagebatch.toml"
    config.write_text("[api]\nsimulate = true\n")
    out = tmp_path / "out"
    result = invoke(["run", str(jobs), "--out", str(out), "-q", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "built-in simulator" in result.output
    assert json.loads((out / "run.json").read_text())["simulator"] is True
    config.write_text("simulate = false\n")
    result = invoke(["run", str(jobs), "--out", str(out), "-q", "--config", str(config)])
    assert result.exit_code == 2 and "--simulate" in result.output


def test_simulate_wins_over_a_configured_server(prefect_api, fresh_sim, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.csv", [{"prompt": "x", "model": "gpt-image-2"}])
    result = invoke(
        ["run", str(jobs), "--out", str(tmp_path / "out"), "-q", "--simulate"],
        env=api_env(fresh_sim),
    )
    assert result.exit_code == 0, result.output
    assert fresh_sim.stats()["requests_seen"] == 0  # the configured server was never called
    assert SECRET not in all_text(tmp_path / "out")


def test_chunked_tasks_make_the_same_images(prefect_api, fresh_sim, tmp_path):
    config = tmp_path / "imagebatch.toml"
    config.write_text('[flow]\ntask_per = "chunk"\nchunk_jobs = 7\n')
    rows = [
        {"prompt": f"item {i}", "model": "dall-e-3" if i % 3 else "gpt-image-2", "n": 1 + i % 2}
        for i in range(20)
    ]
    rows[5]["prompt"] = "a forbidden item"
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    result = invoke(
        ["run", str(jobs), "--out", str(tmp_path / "out"), "-q", "--config", str(config)],
        env=api_env(fresh_sim),
    )
    assert result.exit_code == 1, result.output
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert len(manifest) == sum(r["n"] for r in rows)
    assert set(manifest[manifest.row == 6].status) == {"rejected"}
    assert (manifest[manifest.row != 6].status == "succeeded").all()
    assert fresh_sim.stats()["images_billed"] == len(manifest) - (manifest.row == 6).sum()
