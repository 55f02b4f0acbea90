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


class Jobs(list[Job]):
    """The rows, plus the dtype of each carried-through column (so an integer SKU stays one)."""

    extra_dtypes: dict[str, Any]

    def __init__(self, jobs: list[Job], extra_dtypes: dict[str, Any] | None = None) -> None:
        super().__init__(jobs)
        self.extra_dtypes = extra_dtypes or {}


def _column_names(raw: list[Any]) -> list[str]:
    """Names trimmed; job columns matched case-insensitively (`Model`, ` N `). A column that
    appears twice is a whole-file problem: which of the two would be meant?"""
    names = []
    for i, c in enumerate(raw, start=1):
        name = "" if c is None or (isinstance(c, float) and math.isnan(c)) else str(c).strip()
        if name.lower() in JOB_COLUMNS:
            name = name.lower()
        names.append(name or f"column_{i}")
    seen: dict[str, list[str]] = {}
    for original, name in zip(raw, names):
        seen.setdefault(name, []).append(str(original))
    dupes = {name: originals for name, originals in seen.items() if len(originals) > 1}
    if dupes:
        name, originals = next(iter(sorted(dupes.items())))
        raise InputError(
            f"the jobs table has the column {name!r} more than once "
            f"({', '.join(repr(o) for o in originals)}); keep one"
        )
    return names


def jobs_from_frame(frame: pd.DataFrame) -> Jobs:
    columns = _column_names(list(frame.columns))
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
    return Jobs(jobs, {c: frame[c].dtype for c in extras})


def _read_csv(path: Path) -> pd.DataFrame:
    """Everything as text ("007" stays "007", ids never become floats). The header is read as
    a plain row, so duplicate names reach `_column_names` instead of being renamed `x.1`."""
    with path.open("rb") as f:
        head = f.read(8192)
    if b"\x00" in head:
        raise InputError(f"{path} is a binary file, not a CSV (or Parquet) jobs file")
    raw = pd.read_csv(
        path,
        header=None,
        dtype=str,
        keep_default_na=False,
        encoding="utf-8-sig",
        skipinitialspace=False,
    )
    header = list(raw.iloc[0]) if len(raw) else []
    return raw.iloc[1:].reset_index(drop=True).set_axis(header, axis=1)


def read_jobs(source: str | Path | pd.DataFrame) -> Jobs:
    """Jobs from a CSV (UTF-8, BOM or not, quoted newlines allowed), a Parquet file or a DataFrame."""
    if isinstance(source, pd.DataFrame):
        return jobs_from_frame(source)
    path = Path(source)
    if not path.is_file():
        what = "is a folder, not a jobs file" if path.is_dir() else "not found"
        raise InputError(f"jobs file {what}: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            frame = _read_csv(path)
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
        ) from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty: a jobs file needs a header row") from None
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise InputError(f"cannot read {path} as a jobs table: {detail}") from None
    return jobs_from_frame(frame)
