"""Source rows as `imagebatch validate` sees them: every problem with a source is that row's
error (named by row and column) and the other rows stay valid."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pandas as pd
from click.testing import CliRunner
from PIL import Image

from imagebatch.cli import main

# A compatible server, not api.openai.com: retired models (dall-e-2) are warnings, not errors.
ENV = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}


def _bomb(path: Path, side: int) -> None:
    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _folder(tmp_path: Path) -> Path:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    Image.new("RGB", (300, 200), "red").save(jobs / "photo.png")
    Image.new("L", (300, 200), 0).save(jobs / "photo_mask.png")
    Image.new("L", (100, 100), 0).save(jobs / "square_mask.png")
    data = io.BytesIO()
    Image.frombytes("RGB", (200, 200), os.urandom(120_000)).save(data, "PNG")
    (jobs / "truncated.png").write_bytes(data.getvalue()[:50_000])
    _bomb(jobs / "bomb.png", 12_000)
    Image.new("RGB", (64, 64)).save(tmp_path / "outside.png")
    (jobs / "link.png").symlink_to(tmp_path / "outside.png")
    return jobs


ROWS = [
    ("photo.png", "photo_mask.png", "", ""),  # row 1: valid (padded, mask converted)
    ("truncated.png", "", "image", "truncated or corrupt"),
    ("bomb.png", "", "image", "decompression-bomb guard"),
    ("../outside.png", "", "image", "outside"),
    ("link.png", "", "image", "outside"),
    ("photo.png", "square_mask.png", "mask", "cannot be matched"),
    ("missing.png", "", "image", "file not found"),
    ("photo.png", "", "", ""),  # row 8: valid
]


def _write_jobs(jobs: Path) -> Path:
    frame = pd.DataFrame(
        [
            {"prompt": "a red box", "operation": "edit", "model": "dall-e-2", "image": i, "mask": m}
            for i, m, _, _ in ROWS
        ]
    )
    frame.to_csv(jobs / "jobs.csv", index=False)
    return jobs / "jobs.csv"


def test_each_bad_source_is_its_own_rows_error(tmp_path):
    csv = _write_jobs(_folder(tmp_path))
    result = CliRunner().invoke(main, ["validate", str(csv)], catch_exceptions=False, env=ENV)
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    for row, (_, _, column, fragment) in enumerate(ROWS, start=1):
        if column:
            assert f"invalid row {row}, column '{column}':" in out
            line = out.split(f"row {row}, column '{column}':")[1].split(" row ")[0]
            assert fragment in line, (row, line)
        else:
            assert f"invalid row {row}," not in out
    assert "8 rows: 2 valid, 6 invalid" in out


def test_sources_root_and_allow_outside_lift_the_folder_rule(tmp_path):
    csv = _write_jobs(_folder(tmp_path))
    frame = pd.DataFrame(
        [{"prompt": "p", "operation": "edit", "model": "gpt-image-2", "image": "../outside.png"}]
    )
    frame.to_csv(csv, index=False)
    refused = CliRunner().invoke(main, ["validate", str(csv)], catch_exceptions=False, env=ENV)
    assert refused.exit_code == 1 and "outside" in refused.output
    for setting in ("allow_outside_sources = true", f'sources_root = "{tmp_path}"'):
        config = tmp_path / "c.toml"
        config.write_text(f"[inputs]\n{setting}\n")
        if "sources_root" in setting:
            frame.assign(image="outside.png").to_csv(csv, index=False)
        ok = CliRunner().invoke(
            main, ["validate", str(csv), "--config", str(config)], catch_exceptions=False, env=ENV
        )
        assert ok.exit_code == 0, ok.output


def test_jobs_from_folder_pairs_masks_and_validates(tmp_path):
    folder = tmp_path / "shoot"
    folder.mkdir()
    Image.new("RGB", (120, 80), "red").save(folder / "x.jpg")
    Image.new("L", (120, 80), 255).save(folder / "x_mask.png")
    Image.new("RGB", (64, 64), "blue").save(folder / "y.png")
    Image.new("RGB", (64, 64), "blue").save(folder / "y.webp")
    Image.new("L", (64, 64), 0).save(folder / "orphan_mask.png")
    Image.new("RGB", (8, 8)).save(folder / ".hidden.png")
    (folder / "notes.txt").write_text("not an image")
    runner = CliRunner()
    args = ["jobs-from-folder", str(folder), "--operation", "edit", "--prompt", "add snow"]
    result = runner.invoke(main, [*args, "--model", "gpt-image-2"], catch_exceptions=False, env=ENV)
    assert result.exit_code == 0, result.output
    assert "orphan_mask.png is a mask with no image of that name" in result.output
    frame = pd.read_csv(folder / "jobs.csv", keep_default_na=False)
    assert list(frame["id"]) == ["x", "y.png", "y.webp"]
    assert list(frame["image"]) == ["x.jpg", "y.png", "y.webp"]
    assert list(frame["mask"]) == ["x_mask.png", "", ""]
    assert set(frame["operation"]) == {"edit"} and set(frame["prompt"]) == {"add snow"}
    again = runner.invoke(main, args, catch_exceptions=False, env=ENV)
    assert again.exit_code == 2 and "--force" in again.output
    check = runner.invoke(
        main, ["validate", str(folder / "jobs.csv")], catch_exceptions=False, env=ENV
    )
    assert check.exit_code == 0, check.output

    out = tmp_path / "variations.csv"
    result = runner.invoke(
        main,
        ["jobs-from-folder", str(folder), "--operation", "variation", "-o", str(out)],
        catch_exceptions=False,
        env=ENV,
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame["image"]) == ["shoot/x.jpg", "shoot/y.png", "shoot/y.webp"]
    assert set(frame["model"]) == {"dall-e-2"} and set(frame["mask"]) == {""}
    check = runner.invoke(main, ["validate", str(out)], catch_exceptions=False, env=ENV)
    assert check.exit_code == 0, check.output


def test_image_keys_follow_source_bytes_and_preparation_settings(tmp_path):
    """Renaming a source keeps its key (the bytes are the same); other bytes or another fit
    (other bytes would be sent) give another key."""
    from imagebatch.configs.registry import Registry
    from imagebatch.configs.settings import InputSettings, JobDefaults
    from imagebatch.tasks.plan import plan_jobs
    from imagebatch.tasks.read_jobs import read_jobs
    from imagebatch.tasks.validate import Validator

    Image.new("RGB", (300, 200), "red").save(tmp_path / "a.png")
    (tmp_path / "renamed.png").write_bytes((tmp_path / "a.png").read_bytes())
    Image.new("RGB", (300, 200), "blue").save(tmp_path / "other.png")

    def key(image: str, fit: str = "", **inputs) -> str:
        row = {"prompt": "p", "operation": "edit", "model": "dall-e-2", "image": image, "fit": fit}
        validator = Validator(
            Registry.load(),
            JobDefaults(),
            targets_openai=False,
            base_dir=tmp_path,
            inputs=InputSettings(**inputs),
        )
        checked = validator.check(read_jobs(pd.DataFrame([row])))
        assert checked.valid, checked.problems
        return plan_jobs(checked.valid)[0].keys[0]

    assert key("a.png") == key("renamed.png") == key("a.png", "pad")
    assert key("a.png") != key("other.png")
    assert key("a.png") != key("a.png", "crop")
    assert key("a.png") != key("a.png", pad_color="black")
    # a setting that cannot change what is sent leaves the key alone
    assert key("a.png") == key("a.png", mask_repaint="black")
