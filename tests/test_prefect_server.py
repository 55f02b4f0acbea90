"""Runs the way teams run them, against a real Prefect server (SQLite, loopback) started by the
`prefect_server` fixture: `prefect deploy` of prefect.yaml + `prefect worker start`, and
`imagebatch serve` with an every-minute cron that must fire by itself. Each run writes its own
dated folder and manifest, publishes its artifacts, ends in the state its counts call for,
and the API key never reaches the server's database or PREFECT_HOME.

These take minutes (a cron fires on the minute), bounded by generous waits, never timed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers import wait_for

from imagebatch.simulator import SimConfig, SimulatorServer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KEY = "sk-h9-never-stored-5e1f0c7a"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture
def sim():
    server = SimulatorServer(SimConfig(api_key=KEY)).start()
    yield server
    server.stop()


def jobs_csv(path: Path) -> Path:
    """Three images that succeed and one the moderation refuses, with a CSV-borne note."""
    rows = [
        {"id": "mug-red", "prompt": "a red mug on a table", "sku": "A1"},
        {"id": "mug-blue", "prompt": "a blue mug [b]bold[/b] <i>", "sku": "A2"},
        {"id": "mug-green", "prompt": "a green mug", "sku": "A3"},
        {"id": "mug-bad", "prompt": "a forbidden mug", "sku": "A4"},
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def run_cli(server: Any, args: list[str], env: dict[str, str], cwd: Path = ROOT) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]} {done.stderr[-3000:]}"
    return done.stdout


def final_flow_run(server: Any, flow_run_id: str, seconds: float = 300) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run = server.get(f"/flow_runs/{flow_run_id}")
        return run if run["state"] and run["state"]["type"] in FINAL else None

    return wait_for(check, seconds, f"flow run {flow_run_id} to finish", every=1)


def artifacts_of(server: Any, flow_run_id: str) -> dict[str, dict[str, Any]]:
    found = server.post(
        "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    )
    return {a["key"]: a for a in found if a.get("key")}


def assert_key_absent(server: Any, *more: Path) -> None:
    """The key's bytes appear in no file of the server's home (database, WAL, logs) or `more`."""
    needle = KEY.encode()
    roots = [server.home, *more]
    checked = 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                checked += 1
                assert needle not in path.read_bytes(), f"the API key is stored in {path}"
    assert server.database.is_file() and checked > 1


def assert_run_folder(root: Path, name: str) -> pd.DataFrame:
    folder = root / name
    manifest = pd.read_csv(folder / "manifest.csv")
    assert sorted(manifest["status"]) == ["rejected", "succeeded", "succeeded", "succeeded"]
    for file in manifest.loc[manifest["status"] == "succeeded", "file"]:
        assert (folder / file).is_file()
    return manifest


def check_artifacts(server: Any, flow_run_id: str, out_dir: Path) -> None:
    arts = artifacts_of(server, flow_run_id)
    assert {"imagebatch-progress", "imagebatch-summary", "imagebatch-failures"} <= set(arts)
    assert float(arts["imagebatch-progress"]["data"]) == 100.0
    table = json.loads(arts["imagebatch-summary"]["data"])
    by = {(r["what"], r["model"]): r["value"] for r in table}
    assert by[("succeeded", "gpt-image-2")] == 3
    assert by[("rejected", "gpt-image-2")] == 1
    assert by[("images requested", "all")] == 4
    assert by[("possibly paid twice", "all")] == 0
    assert by[("output folder", "all")] == str(out_dir)
    failures = arts["imagebatch-failures"]["data"]
    assert "1 of 4 image(s) did not succeed" in failures
    assert "mug\\-bad" in failures and "rejected" in failures


SUBMIT_AND_WAIT = """
import json, sys
import pandas as pd
import imagebatch
df = pd.DataFrame({"prompt": ["a white mug", "a black mug"], "sku": ["N1", "N2"]})
# The deployment names the key's Secret block; this adds a setting on top of it.
sub = imagebatch.submit(df, out_root=sys.argv[1], quality="low")
manifest = imagebatch.wait(sub, timeout=300)
info = manifest.attrs["imagebatch"]
print(json.dumps({"id": sub.flow_run_id, "url": sub.url, "status": list(manifest["status"]),
                  "sku": list(manifest["sku"]), "quality": list(manifest["quality"]), "state": info["state"], "out_dir": info["out_dir"]}))
"""


def test_deployment_from_prefect_yaml_runs_on_a_worker_with_a_secret_block_key(
    prefect_server, sim, procs, tmp_path
):
    env = prefect_server.env(PWD=str(ROOT))
    jobs = jobs_csv(tmp_path / "jobs.csv")
    out_root = tmp_path / "runs"
    # The key lives in a Secret block; the worker's environment has only the base URL.
    subprocess.run(
        [
            str(BIN / "python"),
            "-c",
            "import sys; from prefect.blocks.system import Secret; "
            "Secret(value=sys.stdin.readline().strip()).save('imagebatch-test-key', overwrite=True)",
        ],
        input=KEY + "\n",
        env=env,
        text=True,
        check=True,
        timeout=120,
        capture_output=True,
    )
    run_cli(
        prefect_server,
        [str(BIN / "prefect"), "work-pool", "create", "imagebatch-test", "--type", "process"],
        env,
    )
    params = {
        "jobs": str(jobs),
        "out_root": str(out_root),
        "overrides": {"api": {"key_secret": "imagebatch-test-key"}},
    }
    run_cli(
        prefect_server,
        [
            str(BIN / "prefect"),
            "--no-prompt",
            "deploy",
            "--prefect-file",
            str(ROOT / "prefect.yaml"),
            "--name",
            "catalog",
            "--pool",
            "imagebatch-test",
            "--params",
            json.dumps(params),
        ],
        env,
    )
    deployment = prefect_server.get("/deployments/name/imagebatch/catalog")
    assert deployment["entrypoint"] == "imagebatch.flows.run_jobs:imagebatch_flow"
    assert deployment["parameters"]["out_root"] == str(out_root)

    worker_env = {**env, "OPENAI_BASE_URL": sim.base_url}
    worker_env.pop("OPENAI_API_KEY", None)
    worker_log = (tmp_path / "worker.log").open("wb")
    procs.append(
        subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "imagebatch-test"],
            cwd=tmp_path,
            env=worker_env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    )
    names = []
    for _ in range(2):
        flow_run = prefect_server.post(f"/deployments/{deployment['id']}/create_flow_run", {})
        run = final_flow_run(prefect_server, flow_run["id"])
        # One image refused: by default a run that lost images is Failed, counts in the message.
        assert run["state"]["type"] == "FAILED", run["state"]
        assert "4 images: 3 succeeded, 1 rejected" in run["state"]["message"]
        latest = (out_root / "LATEST").read_text().strip()
        assert latest not in names
        names.append(latest)
        assert (out_root / "latest").resolve() == (out_root / latest).resolve()
        assert_run_folder(out_root, latest)
        check_artifacts(prefect_server, flow_run["id"], out_root / latest)
    # From a notebook: hand a DataFrame to the workers, get the id and link at once, then wait.
    notebook = subprocess.run(
        [str(BIN / "python"), "-c", SUBMIT_AND_WAIT, str(out_root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert notebook.returncode == 0, notebook.stderr[-3000:]
    sub = json.loads(notebook.stdout.strip().splitlines()[-1])
    assert sub["url"] == f"http://127.0.0.1:{prefect_server.port}/runs/flow-run/{sub['id']}"
    assert sub["status"] == ["succeeded", "succeeded"] and sub["sku"] == ["N1", "N2"]
    assert sub["state"] == "Completed" and sub["out_dir"].startswith(str(out_root))
    assert sub["quality"] == ["low", "low"]
    names.append(Path(sub["out_dir"]).name)
    # Every run has its own dated folder; the first is still there, untouched by the others.
    assert sorted(p.name for p in out_root.iterdir() if p.is_dir() and not p.is_symlink()) == (
        sorted(names)
    )
    assert_run_folder(out_root, names[0])
    worker_log.close()
    assert_key_absent(prefect_server, tmp_path)


def test_serve_fires_an_every_minute_cron_by_itself(prefect_server, sim, procs, tmp_path):
    jobs = jobs_csv(tmp_path / "jobs.csv")
    out_root = tmp_path / "nightly"
    env = prefect_server.env(OPENAI_API_KEY=KEY, OPENAI_BASE_URL=sim.base_url)
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [
            str(BIN / "imagebatch"),
            "serve",
            str(jobs),
            "--cron",
            "* * * * *",
            "--out-root",
            str(out_root),
            "--name",
            "every-minute",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs.append(serve)

    def finished_run() -> str | None:
        name = (out_root / "LATEST").read_text().strip() if (out_root / "LATEST").exists() else ""
        return name if name and (out_root / name / "manifest.csv").exists() else None

    # The next minute boundary, plus the runner's poll and a run: generous, bounded.
    name = wait_for(finished_run, 240, "a scheduled run's manifest", serve, every=1)
    manifest = assert_run_folder(out_root, name)
    assert set(manifest["sku"]) == {"A1", "A2", "A3", "A4"}
    deployment = prefect_server.get("/deployments/name/imagebatch/every-minute")
    assert deployment["parameters"]["out_root"] == str(out_root)
    assert "api_key" not in json.dumps(deployment["parameters"])

    def finished_runs() -> list[dict[str, Any]]:
        runs = prefect_server.post(
            "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}
        )
        return [r for r in runs if r["state"]["type"] in FINAL]

    # The folder is marked LATEST just before the run reports its final state: wait for it.
    done = wait_for(finished_runs, 120, "the scheduled run's final state", serve, every=1)
    assert done and all(r["auto_scheduled"] for r in done)
    run = done[0]
    assert run["state"]["type"] == "FAILED"
    assert "3 succeeded, 1 rejected" in run["state"]["message"]
    os.killpg(serve.pid, signal.SIGTERM)
    serve.wait(60)
    log.close()
    assert_key_absent(prefect_server, tmp_path)
