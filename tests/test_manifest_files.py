"""manifest.csv and manifest.parquet are written from plain rows (no pandas in a run of a
CSV), and are what pandas wrote for the same manifest before: the CSV byte for byte, the
Parquet with the same schema, pandas metadata and frame read back.

The reference is the writer the tool used before, written out here with pandas: the
manifest typed as a frame (`Manifest.to_frame`, which the Python API returns), server text
neutralised, `to_csv(index=False)` / `to_parquet(index=False)`."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import imagebatch
from imagebatch.tasks.manifest import (
    COLUMNS,
    SERVER_TEXT,
    Manifest,
    csv_bytes,
    csv_safe,
    parquet_bytes,
)

ROOT = Path(__file__).resolve().parent.parent


def reference_csv(frame: pd.DataFrame) -> bytes:
    shown = frame.copy()
    for col in SERVER_TEXT:
        shown[col] = shown[col].map(csv_safe)
    return shown.to_csv(index=False).encode("utf-8")


def reference_parquet(frame: pd.DataFrame) -> bytes:
    safe = frame.copy()
    for col in safe.columns:
        if safe[col].dtype == object:
            safe[col] = safe[col].map(
                lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
            )
    buf = io.BytesIO()
    safe.to_parquet(buf, index=False)
    return buf.getvalue()


def assert_same_files(manifest: Manifest, csv_data: bytes, parquet_data: bytes) -> None:
    frame = manifest.to_frame()
    assert csv_data == reference_csv(frame)
    ours, theirs = (
        pq.read_schema(io.BytesIO(parquet_data)),
        pq.read_schema(io.BytesIO(reference_parquet(frame))),
    )
    assert ours.equals(theirs)
    assert json.loads(ours.metadata[b"pandas"]) == json.loads(theirs.metadata[b"pandas"])
    pd.testing.assert_frame_equal(
        pd.read_parquet(io.BytesIO(parquet_data)),
        pd.read_parquet(io.BytesIO(reference_parquet(frame))),
    )


def row(i: int, **cells):
    """A manifest row as build_rows makes it (a planned image with a journal record)."""
    base = {c: None for c in COLUMNS}
    base.update(job_id=f"job{i}", row=i, image_index=0, status="succeeded", key=f"k{i}")
    base.update(cells)
    return base


CASES = {
    "empty": ([], []),
    "text that needs quoting": (
        [
            row(1, prompt='a "quoted", comma\nand newline', revised_prompt="=HYPERLINK(1)\x07"),
            row(2, prompt="  spaces  ", error_message="+cmd", error_code="-1", request_id="@x"),
            row(3, prompt="一张猫的照片 \u2028 é", status="failed", error_message="line\r\nbreak"),
        ],
        [],
    ),
    "numbers: integers, floats, 1.0 and missing": (
        [
            row(1, width=1024, height=1024, attempts=1, input_tokens=12, output_tokens=4160),
            row(2, width=None, attempts=3, ambiguous_retries=1, input_tokens=12.5, cost_usd=0.04),
            row(3, cost_usd=1.0, estimated_usd=1e-05, output_tokens=1.0, call_images=2),
            row(4, cost_usd=0.1 + 0.2, estimated_usd=123456789.125, input_tokens=None),
        ],
        [],
    ),
    "whole-number token counts stay integers": (
        [row(1, input_tokens=10, output_tokens=20), row(2, input_tokens=11, output_tokens=21)],
        [],
    ),
    "carried-through columns, renamed and empty": (
        [
            {**row(1), "sku": "A-1", "input_status": "x", "note": ""},
            {**row(2), "sku": "007", "input_status": "", "note": "a,b"},
        ],
        ["sku", "status", "note"],
    ),
    "columns no row has (invalid rows only)": (
        [
            {
                "row": 1,
                "job_id": None,
                "image_index": i,
                "prompt": "p",
                "status": "invalid",
                "error_code": "invalid_input",
                "error_message": "row 1, column 'size': not a size",
                "sku": "S",
            }
            for i in range(2)
        ],
        ["sku"],
    ),
    "a column missing from some rows": (
        [row(1, transport="live"), {k: v for k, v in row(2).items() if k != "transport"}],
        [],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_manifest_files_are_what_pandas_wrote(case):
    rows, extra = CASES[case]
    manifest = Manifest.build(rows, extra)
    assert_same_files(manifest, csv_bytes(manifest), parquet_bytes(manifest))


def test_a_run_writes_the_manifest_pandas_wrote(prefect_api, tmp_path):
    """A whole run of the example (every status but not_run, carried-through sku column):
    the files on disk against the reference made from the manifest the API returns."""
    out = tmp_path / "out"
    report = imagebatch.run_report(ROOT / "data" / "catalog.csv", out, simulate=True)
    assert report.counts["succeeded"] and report.counts["invalid"], report.manifest.error_message
    assert "sku" in report.manifest.columns
    assert_same_files(
        report.rows, (out / "manifest.csv").read_bytes(), (out / "manifest.parquet").read_bytes()
    )
