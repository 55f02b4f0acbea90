"""Resume and crash-safety proofs: a run that is killed, interrupted, locked out, re-run with
other settings or runs out of disk never loses finished work and never pays for it twice.

The CLI runs as a real subprocess where a signal matters (SIGKILL, SIGINT, the folder lock),
and in-process through click's CliRunner elsewhere (faster). The simulator runs in-process
on loopback so its billing counters can be read directly.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import wait_for, write_jobs

from imagebatch.cli import main
from imagebatch.simulator import SimConfig, SimulatorServer

KEY = "sk-test-resume"
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def make_sim():
    """Start simulators on demand; all are stopped at teardown."""
    started: list[SimulatorServer] = []

    def make(**knobs: Any) -> SimulatorServer:
        server = SimulatorServer(SimConfig(**knobs)).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def api_env(sim: SimulatorServer) -> dict[str, str]:
    return {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": KEY}


def invoke(args: list[str], sim: SimulatorServer):
    return CliRunner().invoke(main, ["run", *args], env=api_env(sim), catch_exceptions=False)


def start_cli(
    procs: list,
    jobs: Path,
    out: Path,
    args: list[str],
    sim: SimulatorServer,
    prefect_api: str,
    log: Path,
) -> subprocess.Popen:
    env = {**os.environ, **api_env(sim), "PREFECT_API_URL": prefect_api}
    f = log.open("ab")
    p = subprocess.Popen(
        [sys.executable, "-m", "imagebatch.cli", "run", str(jobs), "--out", str(out), "-q", *args],
        env=env,
        stdout=f,
        stderr=subprocess.STDOUT,
        cwd=str(ROOT),
    )
    f.close()
    procs.append(p)
    return p


def journal_lines(out: Path) -> list[dict]:
    path = out / "journal.jsonl"
    if not path.exists():
        return []
    lines = []
    for raw in path.read_bytes().splitlines():
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict):
            lines.append(data)
    return lines


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def latest_records(out: Path) -> dict[str, dict]:
    """The journal's last record per key, as Journal.load sees it."""
    return {rec["key"]: rec for rec in journal_lines(out)}


def assert_journal_truthful(out: Path) -> int:
    """Every key whose latest journal record says succeeded has its bytes on disk with that
    sha256: at its file, or (a crash between the journal line and the rename) where the line
    says they were moved from, which the next run finishes."""
    ok = 0
    for rec in latest_records(out).values():
        if rec["status"] == "succeeded":
            path = out / rec["file"]
            if not path.is_file() and rec.get("moved_from"):
                path = out / rec["moved_from"]
            assert path.is_file(), f"journal says {rec['file']} succeeded but it is not on disk"
            assert sha256_of(path) == rec["sha256"], (
                f"journal sha256 of {rec['file']} does not match the bytes"
            )
            ok += 1
    return ok


def read_manifest(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "manifest.csv", keep_default_na=True)


def image_files(out: Path) -> set[str]:
    images = out / "images"
    return (
        {f"images/{p.name}" for p in images.iterdir() if p.is_file()} if images.is_dir() else set()
    )


def tmp_leftovers(out: Path) -> list[str]:
    staging = out / ".imagebatch-tmp"
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


def assert_manifest_verifies(out: Path, *, all_succeeded: bool) -> pd.DataFrame:
    """Succeeded rows name files whose bytes match; images/ holds exactly those files."""
    m = read_manifest(out)
    assert m.key.notna().all() and m.key.is_unique, (
        "one manifest row per requested image, keys unique"
    )
    if all_succeeded:
        assert m.status.value_counts().to_dict() == {"succeeded": len(m)}
    done = m[m.status == "succeeded"]
    assert done.file.is_unique, "two manifest rows name the same file"
    for row in done.itertuples():
        path = out / row.file
        assert path.is_file(), f"{row.file} missing"
        assert sha256_of(path) == row.sha256, (
            f"{row.file}: sha256 in the manifest does not match the bytes"
        )
    assert image_files(out) == set(done.file), (
        "images/ must hold exactly the files of succeeded rows"
    )
    assert m[m.status != "succeeded"].file.isna().all()
    return m


# --------------------------------------------------------------------------- 1. SIGKILL
def mixed_jobs(n_jobs: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n_jobs):
        if rng.random() < 0.55:
            rows.append(
                {
                    "id": f"g{i:03d}",
                    "prompt": f"a red kite number {i}",
                    "model": "gpt-image-2",
                    "n": rng.randint(1, 3),
                }
            )
        else:
            rows.append(
                {
                    "id": f"d{i:03d}",
                    "prompt": f"a blue boat number {i}",
                    "model": "dall-e-3",
                    "n": rng.randint(1, 2),
                }
            )
    return rows


def in_flight_at_kill(out: Path, lines_before: int, billed: dict[str, Any]) -> tuple[int, int]:
    """What the killed run had in flight when it died: requests the simulator billed to it
    (answered, or cut off and billed on the disconnect) whose images were not all journaled,
    and the images of those. Journal lines are the client's durable receipts; a request with
    only some of its images journaled is still in flight."""
    new = [r for r in journal_lines(out)[lines_before:] if r["status"] == "succeeded"]
    by_request = Counter(r["request_id"] for r in new)
    returned = {r["request_id"]: r["call_images"] for r in new}  # what each call answered
    complete = sum(1 for rid, got in by_request.items() if got == returned[rid])
    return billed["requests_billed"] - complete, billed["images_billed"] - len(new)


def test_sigkill_at_random_points_never_pays_more_than_was_in_flight(
    prefect_api, make_sim, procs, tmp_path
):
    """Issue 14: extra billing after a SIGKILL is never more than the requests in flight at
    that moment. Each run talks to its own simulator, stopped after the kill, so its billing
    is final and belongs to that run alone. At each kill the requests in flight are measured
    (requests the simulator billed to the run whose images the journal does not hold); each
    count must be within --max-in-flight, nothing renamed into images/ may lack its journal
    line, and after the reruns the images billed beyond the manifest must be at most the
    images of those requests."""
    rng = random.Random(20261201)
    rows = mixed_jobs(120, seed=11)
    requested = sum(r["n"] for r in rows)
    calls = sum(r["n"] if r["model"] == "dall-e-3" else 1 for r in rows)
    most = max(r["n"] for r in rows if r["model"] == "gpt-image-2")  # images one call returns
    assert most == 3
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    log = tmp_path / "cli.log"
    max_in_flight = 6
    args = ["--max-in-flight", str(max_in_flight)]
    stats: list[dict] = []

    def finished(sim: SimulatorServer) -> dict:
        """The simulator's final counts: stopped, so no late request can still be billed."""
        thread = sim._thread
        sim.stop()
        assert thread is not None and not thread.is_alive()
        stats.append(sim.stats())
        assert stats[-1]["peak_in_flight"] <= max_in_flight
        return stats[-1]

    # Kill when the journal reaches a (seeded) random share of the images, then after a random
    # extra moment, so the kill lands anywhere: mid-request, mid-store, mid-commit.
    targets = sorted(rng.sample(range(3, requested * 4 // 5), 4))
    in_flight: list[tuple[int, int]] = []  # per kill: requests and images in flight
    for target in targets:
        # Billed when the client goes away mid-request: the worst case for "paid twice".
        sim = make_sim(latency="uniform:0.02,0.2", seed=len(in_flight), bill_on_disconnect=True)
        lines_before = len(journal_lines(out))
        p = start_cli(procs, jobs, out, args, sim, prefect_api, log)
        wait_for(lambda: len(journal_lines(out)) >= target, 120, f"{target} journal lines", p, log)
        time.sleep(rng.uniform(0.0, 0.2))
        p.send_signal(signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL, "the run finished before it could be killed"
        billed = finished(sim)
        requests, images = in_flight_at_kill(out, lines_before, billed)
        in_flight.append((requests, images))
        assert 0 <= requests <= max_in_flight, (target, in_flight)
        assert 0 <= images <= requests * most
        assert not (out / "manifest.csv").exists()  # no killed run got as far as its manifest
        assert_journal_truthful(out)  # a line is written only once its bytes are durable
        # Nothing reaches images/ before its journal line (the line comes before the rename).
        journaled = {rec["file"] for rec in latest_records(out).values() if rec.get("file")}
        assert image_files(out) <= journaled, sorted(image_files(out) - journaled)[:5]

    sim = make_sim(latency="uniform:0.02,0.2", seed=99)
    p = start_cli(procs, jobs, out, args, sim, prefect_api, log)
    assert p.wait(180) == 0, log.read_text(errors="replace")[-3000:]
    finished(sim)

    m = assert_manifest_verifies(out, all_succeeded=True)
    assert len(m) == requested
    assert tmp_leftovers(out) == []
    assert not (out / "superseded").exists() or not any((out / "superseded").iterdir())
    # One file per requested image, named by job id and index.
    expected = {f"{r['id']}_{i}" for r in rows for i in range(r["n"])}
    assert {Path(f).stem for f in image_files(out)} == expected
    assert sorted(m.job_id + "_" + m.image_index.astype(str)) == sorted(expected)

    # Finished work is never requested again: one succeeded journal line per key.
    succeeded_lines = Counter(
        rec["key"] for rec in journal_lines(out) if rec["status"] == "succeeded"
    )
    assert set(succeeded_lines) == set(m.key)
    assert max(succeeded_lines.values()) == 1, [k for k, c in succeeded_lines.items() if c > 1][:5]

    assert sum(s["requests_seen"] for s in stats) >= calls
    overpaid = sum(s["images_billed"] for s in stats) - requested
    assert 0 <= overpaid <= sum(images for _, images in in_flight), in_flight


# --------------------------------------------------------------------------- 2. --retry-failed
def test_rejected_rows_are_kept_until_retry_failed_or_changed(prefect_api, make_sim, tmp_path):
    sim = make_sim(latency=0.01)
    rows = [
        {"id": "ok1", "prompt": "a lamp", "model": "gpt-image-2", "n": 2},
        {"id": "bad1", "prompt": "a forbidden lamp", "model": "gpt-image-2", "n": 2},
        {"id": "ok2", "prompt": "a chair", "model": "dall-e-3", "n": 1},
        {"id": "bad2", "prompt": "forbidden chair", "model": "dall-e-3", "n": 2},
        {"id": "ok3", "prompt": "a table", "model": "gpt-image-2", "n": 1},
        {"id": "bad3", "prompt": "the forbidden table", "model": "gpt-image-2", "n": 1},
    ]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"

    r = invoke([str(jobs), "--out", str(out), "-q"], sim)
    assert r.exit_code == 1, r.output
    m1 = read_manifest(out)
    assert m1.groupby("job_id").status.agg(lambda s: sorted(set(s))).to_dict() == {
        "ok1": ["succeeded"],
        "ok2": ["succeeded"],
        "ok3": ["succeeded"],
        "bad1": ["rejected"],
        "bad2": ["rejected"],
        "bad3": ["rejected"],
    }
    codes = (
        m1.loc[m1.status == "rejected"]
        .groupby("model")
        .error_code.agg(lambda s: sorted(set(s)))
        .to_dict()
    )
    assert codes == {
        "gpt-image-2": ["moderation_blocked"],
        "dall-e-3": ["content_policy_violation"],
    }
    rejected_calls = 1 + 2 + 1  # gpt-image-2 n=2 is one call, dall-e-3 n=2 is two
    assert sim.stats()["moderated"] == rejected_calls

    # Without the flag: nothing is requested, the rejected rows stay rejected.
    sim.reset()
    r = invoke([str(jobs), "--out", str(out), "-q"], sim)
    assert r.exit_code == 1, r.output
    assert sim.stats()["requests_seen"] == 0
    pd.testing.assert_frame_equal(read_manifest(out), m1)

    # --retry-failed on the unchanged CSV re-sends exactly the rejected images, not the others.
    sim.reset()
    r = invoke([str(jobs), "--out", str(out), "-q", "--retry-failed"], sim)
    assert r.exit_code == 1, r.output
    stats = sim.stats()
    assert stats["requests_seen"] == rejected_calls and stats["moderated"] == rejected_calls
    assert stats["images_billed"] == 0
    m2 = read_manifest(out)
    assert (m2.status == m1.status).all() and (m2.key == m1.key).all()
    assert (m2.attempts.fillna(0) >= 1).all()
    ok_cols = ["key", "file", "sha256", "request_id"]
    pd.testing.assert_frame_equal(
        m2.loc[m2.status == "succeeded", ok_cols], m1.loc[m1.status == "succeeded", ok_cols]
    )

    # Edit the CSV: the changed rows get new keys, and only they are requested.
    edited = [{**row, "prompt": row["prompt"].replace("forbidden ", "")} for row in rows]
    write_jobs(jobs, edited)
    sim.reset()
    r = invoke([str(jobs), "--out", str(out), "-q"], sim)
    assert r.exit_code == 0, r.output
    m3 = assert_manifest_verifies(out, all_succeeded=True)
    changed = m3.job_id.str.startswith("bad")
    assert changed.sum() == 5
    old_keys = dict(zip(m1.job_id + "/" + m1.image_index.astype(str), m1.key))
    for row in m3.itertuples():
        same = old_keys[f"{row.job_id}/{row.image_index}"] == row.key
        assert same != row.job_id.startswith("bad"), f"{row.job_id}: key changed={not same}"
    stats = sim.stats()
    assert stats["requests_seen"] == rejected_calls
    assert stats["images_billed"] == changed.sum()
    assert stats["moderated"] == 0


# --------------------------------------------------------------------------- 3. --force
def test_force_redoes_every_image(prefect_api, make_sim, tmp_path):
    sim = make_sim(latency=0.01)
    rows = [
        {
            "id": f"f{i}",
            "prompt": f"a cup {i}",
            "model": "dall-e-3" if i % 3 == 0 else "gpt-image-2",
            "n": 2 if i % 3 == 0 else 1,
        }
        for i in range(12)
    ]
    images = sum(r["n"] for r in rows)
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    assert invoke([str(jobs), "--out", str(out), "-q"], sim).exit_code == 0
    first = assert_manifest_verifies(out, all_succeeded=True)
    assert sim.stats()["images_billed"] == images

    sim.reset()
    r = invoke([str(jobs), "--out", str(out), "-q", "--force"], sim)
    assert r.exit_code == 0, r.output
    stats = sim.stats()
    assert stats["requests_seen"] == images  # every call here asks for one image
    assert stats["images_billed"] == images
    second = assert_manifest_verifies(out, all_succeeded=True)
    assert list(second.key) == list(first.key)
    assert set(second.request_id).isdisjoint(set(first.request_id)), (
        "every image must come from a new request"
    )
    assert len(second) == images and tmp_leftovers(out) == []


# --------------------------------------------------------------------------- 4. changed settings
def test_changed_default_settings_refuse_unless_allowed(prefect_api, make_sim, tmp_path):
    sim = make_sim(latency=0.01)
    rows = [
        {"id": "empty1", "prompt": "a hat", "size": "", "n": 2},
        {"id": "empty2", "prompt": "a shoe", "size": "", "n": 1},
        {"id": "fixed", "prompt": "a sock", "size": "1024x1024", "n": 1},
    ]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    r = invoke([str(jobs), "--out", str(out), "-q", "--model", "gpt-image-2"], sim)
    assert r.exit_code == 0, r.output
    first = assert_manifest_verifies(out, all_succeeded=True)
    run_json = (out / "run.json").read_bytes()

    sim.reset()
    r = invoke(
        [str(jobs), "--out", str(out), "-q", "--model", "gpt-image-2", "--size", "1536x1024"], sim
    )
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "other settings" in text and "size" in text and "1536x1024" in text
    assert "--allow-changed-settings" in text
    assert sim.stats()["requests_seen"] == 0
    pd.testing.assert_frame_equal(read_manifest(out), first)
    assert (out / "run.json").read_bytes() == run_json

    r = invoke(
        [
            str(jobs),
            "--out",
            str(out),
            "-q",
            "--model",
            "gpt-image-2",
            "--size",
            "1536x1024",
            "--allow-changed-settings",
        ],
        sim,
    )
    assert r.exit_code == 0, r.output
    second = assert_manifest_verifies(out, all_succeeded=True)
    stats = sim.stats()
    assert (
        stats["images_billed"] == 3 and stats["requests_seen"] == 2
    )  # only the rows with an empty size
    by_id = second.set_index(second.job_id + "/" + second.image_index.astype(str))
    old = first.set_index(first.job_id + "/" + first.image_index.astype(str))
    assert by_id.loc["fixed/0", "key"] == old.loc["fixed/0", "key"]
    assert by_id.loc["fixed/0", "sha256"] == old.loc["fixed/0", "sha256"]
    for k in ("empty1/0", "empty1/1", "empty2/0"):
        assert by_id.loc[k, "key"] != old.loc[k, "key"]
        assert (by_id.loc[k, "width"], by_id.loc[k, "height"]) == (1536, 1024)
        assert by_id.loc[k, "size"] == "1536x1024"
    assert json.loads((out / "run.json").read_text())["shaping"]["size"] == "1536x1024"


def test_changed_settings_refused_after_a_killed_first_run(prefect_api, make_sim, procs, tmp_path):
    sim = make_sim(latency=0.3)
    rows = [{"id": f"k{i}", "prompt": f"a kettle {i}"} for i in range(30)]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    log = tmp_path / "cli.log"
    p = start_cli(
        procs, jobs, out, ["--max-in-flight", "2", "--model", "gpt-image-2"], sim, prefect_api, log
    )
    wait_for(lambda: len(journal_lines(out)) >= 2, 60, "2 journal lines", p, log)
    p.send_signal(signal.SIGKILL)
    assert p.wait(10) == -signal.SIGKILL
    assert assert_journal_truthful(out) >= 2
    sim.configure(latency=0.01)
    sim.reset()
    r = invoke(
        [str(jobs), "--out", str(out), "-q", "--model", "gpt-image-2", "--size", "1536x1024"], sim
    )
    assert r.exit_code == 2, r.output
    assert sim.stats()["requests_seen"] == 0


# --------------------------------------------------------------------------- 5. lock
def test_folder_lock_refuses_a_second_run_and_dies_with_its_holder(
    prefect_api, make_sim, procs, tmp_path
):
    sim = make_sim(latency=1.0)
    rows = [{"id": f"l{i}", "prompt": f"a lock {i}", "model": "gpt-image-2"} for i in range(20)]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    log = tmp_path / "cli.log"
    p = start_cli(procs, jobs, out, ["--max-in-flight", "2"], sim, prefect_api, log)
    lock = out / ".imagebatch.lock"
    wait_for(
        lambda: lock.exists() and f"pid {p.pid} " in lock.read_text(errors="replace"),
        60,
        "the lock",
        p,
        log,
    )
    wait_for(lambda: sim.stats()["requests_seen"] >= 1, 30, "the first request", p, log)

    flow_runs_before = _flow_run_count()
    r = invoke([str(jobs), "--out", str(out), "-q"], sim)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "in use by another imagebatch run" in text and f"pid {p.pid}" in text
    assert p.poll() is None, "the first run should still be going"
    assert _flow_run_count() == flow_runs_before, "refused before starting a Prefect flow run"
    assert not (out / "manifest.csv").exists()
    # the holder records its shaping settings before its first image; the refused run wrote nothing
    assert json.loads((out / "run.json").read_text()).get("in_progress") is True

    p.send_signal(signal.SIGKILL)
    assert p.wait(10) == -signal.SIGKILL
    done_before = assert_journal_truthful(out)
    assert done_before < len(rows)
    sim.configure(latency=0.01)
    sim.reset()
    r = invoke([str(jobs), "--out", str(out), "-q"], sim)
    assert r.exit_code == 0, r.output
    assert_manifest_verifies(out, all_succeeded=True)
    assert sim.stats()["images_billed"] == len(rows) - done_before


def _flow_run_count() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.count_flow_runs()  # all of the session's runs, never a capped page


# --------------------------------------------------------------------------- 6. Ctrl-C
@pytest.mark.parametrize(
    "sig, chunks",
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGINT", "SIGTERM", "SIGINT-chunks"],
)
def test_interrupt_finishes_in_flight_writes_manifest_and_resumes(
    prefect_api, make_sim, procs, tmp_path, sig, chunks
):
    sim = make_sim(latency=1.0)
    rows = [
        {"id": f"c{i:02d}", "prompt": f"a clock {i}", "model": "gpt-image-2", "n": 1 + i % 2}
        for i in range(40)
    ]
    total = sum(r["n"] for r in rows)
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    log = tmp_path / "cli.log"
    args = ["--max-in-flight", "3"]
    if chunks:  # 8 chunk tasks of 5 jobs: a stop leaves the later chunks unstarted
        config = tmp_path / "imagebatch.toml"
        config.write_text('[flow]\ntask_per = "chunk"\nchunk_jobs = 5\n', encoding="utf-8")
        args += ["--config", str(config)]
    p = start_cli(procs, jobs, out, args, sim, prefect_api, log)
    wait_for(lambda: len(journal_lines(out)) >= 3, 60, "3 journal lines", p, log)
    wait_for(lambda: sim.stats()["in_flight"] >= 1, 10, "a request in flight", p, log)
    p.send_signal(sig)
    # A hang detector, not a speed test: the stop is proven below by what was and was not sent.
    code = p.wait(120)
    output = " ".join(log.read_text(errors="replace").split())
    assert code == 2, output[-3000:]
    assert "interrupted" in output.lower()

    m = assert_manifest_verifies(out, all_succeeded=False)
    counts = m.status.value_counts().to_dict()
    assert set(counts) == {"succeeded", "not_run"}, counts
    assert counts["not_run"] >= total // 2
    # In-flight requests were let finish, not abandoned: every billed image is in the manifest.
    stats = sim.stats()
    assert stats["client_disconnects"] == 0 and stats["in_flight"] == 0
    assert stats["images_billed"] == counts["succeeded"]
    assert assert_journal_truthful(out) == counts["succeeded"]
    run = json.loads((out / "run.json").read_text())
    assert run["stopped"] and run["counts"]["not_run"] == counts["not_run"]

    sim.configure(latency=0.01)
    sim.reset()
    r = invoke([str(jobs), "--out", str(out), "-q"], sim)
    assert r.exit_code == 0, r.output
    final = assert_manifest_verifies(out, all_succeeded=True)
    assert len(final) == total
    assert sim.stats()["images_billed"] == counts["not_run"]


def test_second_sigint_abandons_requests_in_flight(prefect_api, make_sim, procs, tmp_path):
    sim = make_sim(latency=8.0)
    rows = [
        {"id": f"a{i:02d}", "prompt": f"an anchor {i}", "model": "gpt-image-2"} for i in range(10)
    ]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    log = tmp_path / "cli.log"
    p = start_cli(procs, jobs, out, ["--max-in-flight", "3"], sim, prefect_api, log)
    wait_for(lambda: sim.stats()["in_flight"] >= 3, 60, "3 requests in flight", p, log)
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert p.poll() is None, "the first SIGINT must wait for requests in flight"
    p.send_signal(signal.SIGINT)
    code = p.wait(120)  # a hang detector; the abandonment is proven by the outcomes below
    assert code == 2, log.read_text(errors="replace")[-3000:]
    m = assert_manifest_verifies(out, all_succeeded=False)
    # Had the run waited for its requests (8 s each), they would have succeeded.
    assert m.status.value_counts().to_dict() == {"not_run": len(rows)}
    assert tmp_leftovers(out) == []


# --------------------------------------------------------------------------- 7. corrupt files
def test_truncated_and_deleted_images_are_requested_again(prefect_api, make_sim, tmp_path):
    sim = make_sim(latency=0.01)
    rows = [
        {"id": f"t{i}", "prompt": f"a tree {i}", "model": "gpt-image-2", "n": 3 if i == 0 else 1}
        for i in range(8)
    ]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    assert invoke([str(jobs), "--out", str(out), "-q"], sim).exit_code == 0
    first = assert_manifest_verifies(out, all_succeeded=True)

    truncated = out / first.loc[(first.job_id == "t0") & (first.image_index == 1), "file"].item()
    deleted = out / first.loc[first.job_id == "t5", "file"].item()
    truncated.write_bytes(truncated.read_bytes()[:100])
    deleted.unlink()

    # A crash mid-append (power loss) can leave a torn last journal line; it must not glue onto the next.
    with (out / "journal.jsonl").open("ab") as f:
        f.write(b'{"key":"' + first.key[0].encode() + b'","job_id":"t0","ind')
    lines_before = len(journal_lines(out))

    sim.reset()
    r = invoke([str(jobs), "--out", str(out), "-q"], sim)
    assert r.exit_code == 0, r.output
    stats = sim.stats()
    assert stats["requests_seen"] == 2 and stats["images_billed"] == 2
    # two new images, and one line for the truncated file: moved to superseded/, never deleted
    assert len(journal_lines(out)) == lines_before + 3
    assert [p.name for p in (out / "superseded").iterdir()] == [truncated.name]
    second = assert_manifest_verifies(out, all_succeeded=True)
    changed = second[second.request_id != first.request_id]
    assert sorted(changed.file) == sorted([f"images/{truncated.name}", f"images/{deleted.name}"])
    assert "8 image(s) already done" in r.output


# --------------------------------------------------------------------------- 8. disk full
class _OsProxy:
    """Stands in for the `os` module inside one pipeline module; everything else passes through."""

    def __init__(self, **overrides: Any) -> None:
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def _disk_full_jobs(tmp_path: Path) -> tuple[Path, int]:
    rows = [
        {"id": f"s{i:02d}", "prompt": f"a stone {i}", "model": "gpt-image-2", "n": 1 + i % 3}
        for i in range(24)
    ]
    return write_jobs(tmp_path / "jobs.csv", rows), sum(r["n"] for r in rows)


def _assert_stopped_disk_full(r, out: Path, written: int) -> pd.DataFrame:
    assert r.exit_code == 2, r.output
    assert "disk is full" in " ".join(r.output.split())
    m = assert_manifest_verifies(out, all_succeeded=False)
    counts = m.status.value_counts().to_dict()
    assert counts.get("succeeded", 0) <= written
    assert set(counts) <= {"succeeded", "not_run"}, counts
    assert counts.get("not_run", 0) > 0
    assert assert_journal_truthful(out) >= counts.get("succeeded", 0)
    return m


def test_disk_full_writing_images_stops_the_run(prefect_api, make_sim, tmp_path, monkeypatch):
    import imagebatch.tasks.files

    sim = make_sim(latency=0.02)
    jobs, total = _disk_full_jobs(tmp_path)
    out = tmp_path / "out"
    allowed = 5
    replaced = []

    def replace(src, dst):
        if Path(dst).parent.name == "images":
            if len(replaced) >= allowed:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            replaced.append(Path(dst).name)
        return os.replace(src, dst)

    monkeypatch.setattr(imagebatch.tasks.files, "os", _OsProxy(replace=replace))
    r = invoke([str(jobs), "--out", str(out), "-q", "--max-in-flight", "2"], sim)
    m = _assert_stopped_disk_full(r, out, allowed)
    assert sorted(Path(f).name for f in m.loc[m.status == "succeeded", "file"]) == sorted(replaced)
    assert len(replaced) == allowed
    monkeypatch.undo()
    # Images journaled whose rename failed are staged, not lost: the next run moves them.
    durable = assert_journal_truthful(out)

    billed = sim.stats()["images_billed"]
    sim.reset()
    r = invoke([str(jobs), "--out", str(out), "-q"], sim)
    assert r.exit_code == 0, r.output
    assert_manifest_verifies(out, all_succeeded=True)
    assert tmp_leftovers(out) == []
    assert sim.stats()["images_billed"] == total - durable
    assert billed >= durable


def test_disk_full_writing_the_journal_stops_the_run(prefect_api, make_sim, tmp_path, monkeypatch):
    """The disk fills after `allowed` journal lines. Lines are counted, not write calls: group
    commit puts several lines in one write, so counting calls let a varying number through."""
    import imagebatch.tasks.journal

    sim = make_sim(latency=0.02)
    jobs, total = _disk_full_jobs(tmp_path)
    out = tmp_path / "out"
    allowed = 4
    lines: list[int] = []

    def write(fd, data):
        count = bytes(data).count(b"\n")
        if sum(lines) + count > allowed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        lines.append(count)
        return os.write(fd, data)

    monkeypatch.setattr(imagebatch.tasks.journal, "os", _OsProxy(write=write))
    r = invoke([str(jobs), "--out", str(out), "-q", "--max-in-flight", "2"], sim)
    m = _assert_stopped_disk_full(r, out, allowed)
    durable = sum(lines)
    assert (m.status == "succeeded").sum() == durable == assert_journal_truthful(out)
    monkeypatch.undo()

    sim.reset()
    r = invoke([str(jobs), "--out", str(out), "-q"], sim)
    assert r.exit_code == 0, r.output
    assert_manifest_verifies(out, all_succeeded=True)
    assert tmp_leftovers(out) == []
    assert sim.stats()["images_billed"] == total - durable


def test_short_journal_write_is_not_taken_as_durable(prefect_api, make_sim, tmp_path, monkeypatch):
    import imagebatch.tasks.journal

    sim = make_sim(latency=0.02)
    jobs, total = _disk_full_jobs(tmp_path)
    out = tmp_path / "out"
    calls = []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 3:  # the disk fills in the middle of this line; space frees up later
            return os.write(fd, data[: len(data) // 2])
        return os.write(fd, data)

    monkeypatch.setattr(imagebatch.tasks.journal, "os", _OsProxy(write=write))
    r = invoke([str(jobs), "--out", str(out), "-q", "--max-in-flight", "2"], sim)
    monkeypatch.undo()
    m = read_manifest(out)
    # Whatever the run reports as succeeded must be in the journal, its durable memory.
    journal_done = {k for k, rec in latest_records(out).items() if rec["status"] == "succeeded"}
    manifest_done = set(m.loc[m.status == "succeeded", "key"])
    assert manifest_done <= journal_done, (
        f"{len(manifest_done - journal_done)} succeeded image(s) not in the journal"
    )
    sim.reset()
    r = invoke([str(jobs), "--out", str(out), "-q"], sim)
    assert r.exit_code == 0, r.output
    assert sim.stats()["images_billed"] == total - len(manifest_done)
