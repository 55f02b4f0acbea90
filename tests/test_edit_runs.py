"""Edits and variations end to end, as a user runs them: the sample jobs in data/ through
`imagebatch run` against the simulator on loopback, then the manifest, the bytes sent,
the masked area and resume."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from imagebatch.cli import main

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


@pytest.fixture
def samples(tmp_path) -> Path:
    """A copy of data/ (the jobs files resolve their sources against their own folder)."""
    folder = tmp_path / "data"
    shutil.copytree(DATA / "sources", folder / "sources")
    for name in ("edits.csv", "variations.csv"):
        shutil.copy(DATA / name, folder / name)
    (folder / "keep.toml").write_text("[inputs]\nkeep_prepared = true\n")
    return folder


def run(sim, jobs: Path, out: Path, *extra: str):
    env = {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-test"}
    args = ["run", str(jobs), "--out", str(out), "--quiet", *extra]
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sample_edits_run_prepared_and_masked(prefect_api, sim, samples, tmp_path):
    out = tmp_path / "out"
    result = run(sim, samples / "edits.csv", out, "--config", str(samples / "keep.toml"))
    assert result.exit_code == 0, result.output
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False).set_index("job_id")
    assert set(manifest["status"]) == {"succeeded"}
    for job_id, row in manifest.iterrows():
        sent = sorted((out / "prepared").glob(f"{job_id}_image*"))
        assert [sha(p) for p in sent] == row["input_sha256"].split("|")
        if row["input_mask"]:
            assert row["input_mask_sha256"] == sha(out / "prepared" / f"{job_id}_mask.png")
    phone = manifest.loc["phone-sky"]
    assert phone["input_files"] == "sources/phone.jpg"
    assert phone["input_preparation"].startswith("rotated 90")
    assert "mask: black-and-white -> alpha (white repaints)" in phone["input_preparation"]
    assert manifest.loc["product-cmyk", "input_preparation"].startswith("CMYK -> RGB")
    assert "16-bit grey" in manifest.loc["scan-16bit", "input_preparation"]
    dalle = manifest.loc["phone-sky-dall-e-2", "input_preparation"]
    assert "padded (white) 640x480 -> 640x640" in dalle and "resized to 512x512" in dalle

    # The mask was applied where it was painted: below the sky the photo is kept, the sky
    # (white in the mask) is new. Compare flat areas of the upright photo.
    with Image.open(samples / "sources" / "phone.jpg") as stored:
        upright = ImageOps.exif_transpose(stored).convert("RGB")
    with Image.open(out / phone["file"]) as image:
        edited = image.convert("RGB").resize(upright.size)
    wall = (int(640 * 0.31), int(480 * 0.76))  # the house wall, far from the mask edge
    sky = (int(640 * 0.5), int(480 * 0.2))
    assert max(abs(a - b) for a, b in zip(edited.getpixel(wall), upright.getpixel(wall))) <= 12
    assert edited.getpixel(sky) != upright.getpixel(sky)

    # Resume: nothing is sent again.
    before = sim.stats()["requests_seen"]
    again = run(sim, samples / "edits.csv", out, "--config", str(samples / "keep.toml"))
    assert again.exit_code == 0, again.output
    assert sim.stats()["requests_seen"] == before
    assert "already done" in again.output


def test_sample_variations_and_per_row_errors(prefect_api, sim, samples, tmp_path):
    jobs = pd.read_csv(samples / "variations.csv", keep_default_na=False)
    (samples / "sources" / "broken.png").write_bytes(
        (samples / "sources" / "logo_palette.png").read_bytes()[:600]
    )
    bad = {"id": "var-broken", "operation": "variation", "model": "dall-e-2"}
    bad.update(image="sources/broken.png", size="256x256", fit="crop")
    pd.concat([jobs, pd.DataFrame([bad])]).to_csv(samples / "variations.csv", index=False)
    out = tmp_path / "out"
    result = run(sim, samples / "variations.csv", out)
    assert result.exit_code == 1, result.output
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False).set_index("job_id")
    assert manifest.loc["var-broken", "status"] == "invalid"
    assert "truncated or corrupt" in manifest.loc["var-broken", "error_message"]
    good = manifest.drop(index="var-broken")
    assert set(good["status"]) == {"succeeded"}
    for file in good["file"]:
        with Image.open(out / file) as image:
            assert image.size == (256, 256)
    assert manifest.loc["var-logo", "input_preparation"].startswith("palette -> RGBA")
    assert "padded (white) 400x300 -> 400x400" in manifest.loc["var-product", "input_preparation"]


class _ReplacesSource:
    """A reporter that overwrites a source file once the run has checked it and is about to
    send: as if another program saved over the photo mid-run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def notice(self, message: str) -> None:
        pass

    def problems(self, problems) -> None:
        pass

    def start(self, total: int, skipped: int) -> None:
        Image.new("RGB", (64, 64), "green").save(self.path)

    def image(self, record) -> None:
        pass

    def finish(self) -> None:
        pass


def test_a_source_changed_after_validation_fails_without_a_request(prefect_api, sim, tmp_path):
    from imagebatch.flows.run_jobs import run_jobs

    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("prompt,operation,model,image\nadd a hat,edit,gpt-image-2,a.png\n")
    before = sim.stats()["requests_seen"]
    report = run_jobs(
        jobs,
        tmp_path / "out",
        base_url=sim.base_url,
        reporter=_ReplacesSource(tmp_path / "a.png"),
    )
    row = report.manifest.iloc[0]
    assert row["status"] == "failed" and row["error_code"] == "input_error"
    assert "a.png changed after it was checked" in row["error_message"]
    assert sim.stats()["requests_seen"] == before
