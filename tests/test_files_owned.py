"""Files the tool does not own are never moved or deleted; its own move, never vanish, and
are found again instead of being paid for twice."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import kill_at_commit, write_jobs

from imagebatch.cli import main
from imagebatch.simulator import SimConfig, SimulatorServer
from imagebatch.tasks.plan import safe_name

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-files-test"


@pytest.fixture
def sim():
    with SimulatorServer(SimConfig(latency=0.01)) as server:
        yield server


def env(sim: SimulatorServer) -> dict[str, str]:
    return {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": KEY}


def run(sim, jobs: Path, out: Path, *flags: str):
    return CliRunner().invoke(
        main, ["run", str(jobs), "--out", str(out), "-q", *flags], env=env(sim)
    )


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def manifest(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "manifest.csv")


def test_symlinked_images_or_journal_is_refused_and_the_target_untouched(
    prefect_api, sim, tmp_path
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"the user's")
    (elsewhere / ".tmp-x").write_bytes(b"also the user's")
    jobs = write_jobs(tmp_path / "jobs.csv", [{"id": "a", "prompt": "x"}])
    for link in ("images", "journal.jsonl"):
        out = tmp_path / f"out-{link}"
        out.mkdir()
        target = elsewhere if link == "images" else elsewhere / "keep.png"
        (out / link).symlink_to(target)
        result = run(sim, jobs, out)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "symbolic link" in lines[0], result.output
        assert tree(elsewhere) == {"keep.png": b"the user's", ".tmp-x": b"also the user's"}
    assert sim.stats()["requests_seen"] == 0


def test_files_the_journal_does_not_name_are_never_touched(prefect_api, sim, tmp_path):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    theirs = {
        "holiday.png": b"not ours",
        ".tmp-notes.png.abcd": b"named like a temp file",
        "a_0.png": b"the name our first image would take",
    }
    for name, data in theirs.items():
        (out / "images" / name).write_bytes(data)
    jobs = write_jobs(
        tmp_path / "jobs.csv", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}]
    )
    assert run(sim, jobs, out).exit_code == 0
    m = manifest(out)
    assert m.file[0].startswith("images/a_0-") and m.file[1] == "images/b_0.png"
    # jobs change: b's image is the tool's and moves aside; the user's files stay put
    jobs = write_jobs(tmp_path / "jobs.csv", [{"id": "a", "prompt": "x"}])
    assert run(sim, jobs, out).exit_code == 0
    for name, data in theirs.items():
        assert (out / "images" / name).read_bytes() == data
    assert sorted(p.name for p in (out / "superseded").iterdir()) == ["b_0.png"]
    assert sim.stats()["images_billed"] == 2


def test_out_dot_beside_the_jobs_file_leaves_its_edit_source_alone(prefect_api, sim, tmp_path):
    from PIL import Image

    folder = tmp_path / "shop"
    (folder / "images").mkdir(parents=True)
    source = folder / "images" / "product.png"
    Image.new("RGBA", (256, 256), (200, 30, 30, 255)).save(source)
    before = source.read_bytes()
    write_jobs(
        folder / "jobs.csv",
        [
            {
                "id": "product",
                "prompt": "on a beach",
                "operation": "edit",
                "image": "images/product.png",
                "model": "gpt-image-1",
            }
        ],
    )
    for _ in range(2):
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            result = CliRunner().invoke(main, ["run", "jobs.csv", "--out", ".", "-q"], env=env(sim))
        finally:
            os.chdir(cwd)
        assert result.exit_code == 0, result.output
        assert source.read_bytes() == before
    assert not (folder / "superseded").exists()
    assert manifest(folder).file.tolist() == ["images/product_0.png"]


def test_a_then_b_then_a_restores_a_from_superseded_instead_of_paying(prefect_api, sim, tmp_path):
    out = tmp_path / "out"
    a = write_jobs(tmp_path / "a.csv", [{"prompt": f"apple {i}"} for i in range(3)])
    b = write_jobs(tmp_path / "b.csv", [{"prompt": f"banana {i}"} for i in range(2)])
    assert run(sim, a, out).exit_code == 0
    first = manifest(out)
    assert run(sim, b, out).exit_code == 0
    assert len(list((out / "superseded").iterdir())) == 3
    billed = sim.stats()["images_billed"]
    result = run(sim, a, out)
    assert result.exit_code == 0, result.output
    assert sim.stats()["images_billed"] == billed  # nothing paid again
    assert "3 image(s) already done" in result.output
    again = manifest(out)
    assert again.sha256.tolist() == first.sha256.tolist()
    for row in again.itertuples():
        assert (out / row.file).is_file() and row.file.startswith("images/")
    assert len(list((out / "superseded").iterdir())) == 2  # b's two images, moved in turn


def test_a_changed_prompt_moves_the_old_file_aside_first(prefect_api, sim, tmp_path):
    out = tmp_path / "out"
    jobs = write_jobs(tmp_path / "jobs.csv", [{"id": "hero", "prompt": "a red car"}])
    assert run(sim, jobs, out).exit_code == 0
    old = (out / "images" / "hero_0.png").read_bytes()
    jobs = write_jobs(tmp_path / "jobs.csv", [{"id": "hero", "prompt": "a blue car"}])
    assert run(sim, jobs, out).exit_code == 0
    assert (out / "superseded" / "hero_0.png").read_bytes() == old
    new = (out / "images" / "hero_0.png").read_bytes()
    assert new != old and manifest(out).file.tolist() == ["images/hero_0.png"]
    # and back: the red car is found in superseded/, not paid for again
    billed = sim.stats()["images_billed"]
    jobs = write_jobs(tmp_path / "jobs.csv", [{"id": "hero", "prompt": "a red car"}])
    assert run(sim, jobs, out).exit_code == 0
    assert sim.stats()["images_billed"] == billed
    assert (out / manifest(out).file[0]).read_bytes() == old


def test_ids_that_clean_to_the_same_name_never_share_a_file(prefect_api, sim, tmp_path):
    out = tmp_path / "out"
    rows = [{"id": "A B", "prompt": "one"}, {"id": safe_name("A B"), "prompt": "two"}]
    jobs = write_jobs(tmp_path / "jobs.csv", rows)
    assert run(sim, jobs, out).exit_code == 0
    m = manifest(out)
    assert m.file.nunique() == 2
    assert run(sim, jobs, out).exit_code == 0
    assert sim.stats()["images_billed"] == 2


def killed_run(
    probe: str, kill_at: int, sim: SimulatorServer, prefect_api: str, tmp_path: Path
) -> tuple[Path, Path]:
    """Six one-image jobs run one at a time by `probe`, which SIGKILLs the run at its
    `kill_at`-th step; (jobs file, output folder)."""
    jobs = write_jobs(
        tmp_path / "jobs.csv", [{"id": f"k{i}", "prompt": f"kite {i}"} for i in range(6)]
    )
    out = tmp_path / "out"
    proc_env = {**os.environ, **env(sim), "PREFECT_API_URL": prefect_api, "KILL_AT": str(kill_at)}
    args = ["run", str(jobs), "--out", str(out), "-q", "--max-in-flight", "1"]
    p = subprocess.run([sys.executable, "-c", probe, *args], env=proc_env, cwd=ROOT, timeout=120)
    assert p.returncode == -9
    return jobs, out


def test_sigkill_between_journal_line_and_rename_pays_nothing_again(prefect_api, sim, tmp_path):
    jobs, out = killed_run(kill_at_commit("before"), 3, sim, prefect_api, tmp_path)
    lines = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and not (out / lines[-1]["file"]).exists()  # the window, for real
    # billed but not durably received when the process died (requests in flight, answers
    # not yet written): these may be paid again, nothing else may
    in_flight = sim.stats()["images_billed"] - len(lines)
    result = run(sim, jobs, out, "--max-in-flight", "1")
    assert result.exit_code == 0, result.output
    # the three durably received are not paid again; only what was in flight is
    assert sim.stats()["images_billed"] == 6 + in_flight
    assert "3 image(s) already done" in result.output
    assert not any((out / ".imagebatch-tmp").iterdir())


KILL_MID_STAGE = """
import os, signal, sys
real_fsync = os.fsync
staged = 0
def fsync(fd):
    global staged
    if "/.imagebatch-tmp/" in os.readlink(f"/proc/self/fd/{fd}"):
        staged += 1
        if staged == int(os.environ["KILL_AT"]):
            # What a power cut may leave of a staged file: its name, half its bytes.
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_fsync(fd)
os.fsync = fsync
from imagebatch.cli import main
sys.exit(main())
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_a_staged_file_cut_short_by_a_crash_is_never_taken_for_a_whole_one(
    prefect_api, sim, tmp_path
):
    """Images are written straight to their staged name (no temporary name): a crash mid-write
    leaves a file under that name, which no journal line names, so the next run clears it and
    asks for that image again instead of moving the half file into images/."""
    jobs, out = killed_run(KILL_MID_STAGE, 4, sim, prefect_api, tmp_path)
    lines = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()]
    (half,) = (out / ".imagebatch-tmp").iterdir()  # the window, for real
    assert len(lines) == 3
    assert f".imagebatch-tmp/{half.name}" not in {line["moved_from"] for line in lines}
    in_flight = sim.stats()["images_billed"] - len(lines)
    result = run(sim, jobs, out, "--max-in-flight", "1")
    assert result.exit_code == 0, result.output
    assert sim.stats()["images_billed"] == 6 + in_flight
    assert not any((out / ".imagebatch-tmp").iterdir())
    m = manifest(out)
    assert (m.status == "succeeded").all() and len(m) == 6
    for row in m.itertuples():
        assert hashlib.sha256((out / row.file).read_bytes()).hexdigest() == row.sha256
    assert {f"images/{p.name}" for p in (out / "images").iterdir()} == set(m.file)
