"""Text and numbers from a jobs file are data: printed literally, refused per row, never a crash."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner

import imagebatch
from imagebatch.cli import main


def invoke(args: list[str]):
    return CliRunner().invoke(main, args, env={}, catch_exceptions=False)


def test_markup_in_cells_is_printed_literally(prefect_api, tmp_path):
    evil_id = "[link=http://evil.example]x[/link]"
    rows = [
        {"id": evil_id, "prompt": "a [/] cat :cat: [bold]", "model": "gpt-image-2"},
        {"id": evil_id, "prompt": "two", "model": "gpt-image-2"},
        {"id": "s", "prompt": "three", "model": "gpt-image-2", "size": "[/]"},
    ]
    jobs = tmp_path / "jobs.csv"
    pd.DataFrame(rows).to_csv(jobs, index=False)
    result = invoke(["run", str(jobs), "--out", str(tmp_path / "out"), "-q", "--simulate"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"id {evil_id!r} is already used by row 1" in text
    assert "got '[/]'" in text
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert manifest.prompt.tolist()[0] == "a [/] cat :cat: [bold]"
    result = invoke(["validate", str(jobs), "--simulate"])
    assert result.exit_code == 1 and "got '[/]'" in result.output


@pytest.mark.parametrize(
    "column,value",
    [
        ("n", "inf"),
        ("n", "-inf"),
        ("n", "nan"),
        ("n", "1_0"),
        ("n", "\uff11\uff10"),  # full-width 10
        ("n", "\u0663"),  # Arabic-Indic 3
        ("n", "\u0662.0"),
        ("output_compression", "-inf"),
        ("output_compression", "inf"),
        ("output_compression", "5_0"),
        ("output_compression", "\uff15\uff10"),
        ("size", "\uff11\uff10\uff12\uff14x\uff11\uff10\uff12\uff14"),
    ],
)
def test_numbers_are_ascii_digits_and_bad_ones_are_that_rows_error(column, value):
    df = pd.DataFrame(
        [
            {"prompt": "a", "model": "gpt-image-2", "output_format": "jpeg", column: value},
            {"prompt": "b", "model": "gpt-image-2", "output_format": "jpeg", "n": "2.0"},
        ]
    )
    checked = imagebatch.validate(df, simulate=True)
    errors = [(p.row, p.column) for p in checked.problems if p.severity == "error"]
    assert errors == [(1, column)], checked.problems
    assert [v.n for v in checked.valid] == [2]


BAD_FILES = {
    "no_prompt.csv": b"sku,model\n1,gpt-image-2\n",
    "latin1.csv": "prompt\nun caf\u00e9\n".encode("latin-1"),
    "binary.csv": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
    "ragged.csv": b"prompt,n\na,1\nb,2,3\n",
    "empty.csv": b"",
    "twice.csv": b"prompt, Prompt ,n\na,b,1\n",
    "model_twice.csv": b"prompt,Model,MODEL\na,gpt-image-2,dall-e-3\n",
    "garbage.parquet": b"not parquet at all",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_an_unreadable_jobs_file_is_one_clean_line_and_no_output_folder(tmp_path, name):
    jobs = tmp_path / name
    jobs.write_bytes(BAD_FILES[name])
    out = tmp_path / "out"
    result = invoke(["run", str(jobs), "--out", str(out), "--simulate"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_file_where_the_output_folder_should_be(tmp_path):
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("prompt\na\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args in (["run", str(jobs), "--out", str(blocker / "sub")],):
        result = invoke([*args, "--simulate"])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), result.output


def test_column_names_are_trimmed_and_case_insensitive_and_manifest_columns_are_never_overwritten(
    prefect_api, tmp_path
):
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        " Prompt ,MODEL, N ,status,width,File,sku\n"
        "a lamp,gpt-image-2,2,discontinued,wide,x.png,1001\n"
        "a chair,dall-e-3,1,active,narrow,y.png,1002\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = invoke(["run", str(jobs), "--out", str(out), "-q", "--simulate"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.count("'status' -> 'input_status'") == 1
    manifest = pd.read_csv(out / "manifest.csv")
    assert manifest.status.tolist() == ["succeeded"] * 3
    assert manifest.model.tolist() == ["gpt-image-2", "gpt-image-2", "dall-e-3"]
    assert manifest.input_status.tolist() == ["discontinued", "discontinued", "active"]
    assert manifest.input_width.tolist() == ["wide", "wide", "narrow"]
    assert manifest.input_File.tolist() == ["x.png", "x.png", "y.png"]
    assert manifest.width.notna().all()
    assert not (out / "superseded").exists()
    # a rerun finds everything done: the carried columns did not disturb the files
    result = invoke(["run", str(jobs), "--out", str(out), "-q", "--simulate"])
    assert result.exit_code == 0 and "3 image(s) already done" in result.output


def test_carried_columns_keep_their_dtypes(prefect_api, tmp_path):
    df = pd.DataFrame(
        {
            "prompt": ["a", "b", ""],
            "sku": pd.array([1001, None, 1003], dtype="Int64"),
            "weight": [1.5, 2.0, None],
            "flag": pd.array([True, False, None], dtype="boolean"),
            "note": ["x", None, "z"],
        }
    )
    out = tmp_path / "out"
    manifest = imagebatch.run(df, out=out, simulate=True, model="gpt-image-2")
    assert manifest.status.tolist() == ["succeeded", "succeeded", "invalid"]
    parquet = pd.read_parquet(out / "manifest.parquet")
    assert str(parquet.sku.dtype) == "Int64" and parquet.sku.tolist()[0] == 1001
    assert pd.isna(parquet.sku.tolist()[1])
    assert str(parquet.flag.dtype) == "boolean"
    assert parquet.weight.dtype == "float64"
    csv = (out / "manifest.csv").read_text(encoding="utf-8")
    assert "1001.0" not in csv and ",1001," in csv


def test_a_decompression_bomb_source_is_that_rows_error(prefect_api, tmp_path):
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)  # 196 M pixels, past Pillow's guard; 24 KB
    df = pd.DataFrame(
        [
            {"prompt": "x", "operation": "edit", "image": str(bomb), "model": "gpt-image-2"},
            {"prompt": "y", "model": "gpt-image-2"},
        ]
    )
    manifest = imagebatch.run(df, out=tmp_path / "out", simulate=True)
    assert manifest.status.tolist() == ["invalid", "succeeded"]
    assert "decompression" in manifest.error_message[0]
