"""Reader: a CSV, Parquet file or DataFrame of jobs becomes a list of `Job` rows.

Reading never judges a row (that is `validate`); it only turns cells into typed values,
keeps the row number for messages and carries unknown columns through untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from imagebatch.tasks.errors import InputError

# Columns with a meaning; every other column is carried through to the manifest.
JOB_COLUMNS = (
    "id",
    "prompt",
    "operation",
    "image",
    "mask",
    "fit",
    "model",
    "size",
    "quality",
    "style",
    "n",
    "background",
    "output_format",
    "output_compression",
    "moderation",
    "input_fidelity",
    "response_format",
    "user",
    "deployment",
)
IMAGE_SEPARATOR = "|"


@dataclass
class Job:
    """One input row. Empty cells are "" (take the default); `row` is the 1-based data row."""

    row: int
    cells: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, column: str) -> str:
        return self.cells.get(column, "")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    if value is pd.NA or value is pd.NaT:
        return ""
    return str(value).strip()


def _extra(value: Any) -> Any:
    """Carried-through cells keep their value; missing ones become None so CSV and Parquet agree."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def jobs_from_frame(frame: pd.DataFrame) -> list[Job]:
    columns = [str(c).strip() for c in frame.columns]
    if len(set(columns)) != len(columns):
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        raise InputError(f"the jobs table has duplicate columns: {dupes}")
    frame = frame.set_axis(columns, axis=1)
    if "prompt" not in frame.columns and "image" not in frame.columns:
        raise InputError("the jobs table needs a 'prompt' column (or 'image' for variations)")
    known = [c for c in columns if c in JOB_COLUMNS]
    extras = [c for c in columns if c not in JOB_COLUMNS]
    jobs = []
    for i, record in enumerate(frame.to_dict(orient="records"), start=1):
        jobs.append(
            Job(
                row=i,
                cells={c: _cell(record[c]) for c in known},
                extra={c: _extra(record[c]) for c in extras},
            )
        )
    return jobs


def read_jobs(source: str | Path | pd.DataFrame) -> list[Job]:
    """Jobs from a CSV (UTF-8, BOM or not, quoted newlines allowed), a Parquet file or a DataFrame."""
    if isinstance(source, pd.DataFrame):
        return jobs_from_frame(source)
    path = Path(source)
    if not path.exists():
        raise InputError(f"jobs file not found: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            # Everything as text: "007" stays "007" and ids are never turned into floats.
            frame = pd.read_csv(
                path,
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
                skipinitialspace=False,
            )
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text: {exc}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    return jobs_from_frame(frame)
