"""Reader: a CSV, Parquet file or DataFrame of jobs becomes a list of `Job` rows.

Reading never judges a row (that is `validate`); it only turns cells into typed values,
keeps the row number for messages and carries unknown columns through untouched.
A CSV is read with the standard library, not pandas: `imagebatch validate` then starts in
a fraction of a second (pandas brings pyarrow and numpy); Parquet and DataFrames need pandas.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagebatch.tasks.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

# Prompts can be long; a cell is never refused for its length here (validate judges it).
CSV_FIELD_LIMIT = 64 * 1024 * 1024

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
    if _missing(value):
        return ""
    return str(value).strip()


def _missing(value: Any) -> bool:
    """pandas' NA and NaT (only a DataFrame or Parquet file, read with pandas, has them)."""
    pd = sys.modules.get("pandas")
    return pd is not None and (value is pd.NA or value is pd.NaT)


def is_frame(value: Any) -> bool:
    """A pandas DataFrame, told without importing pandas (if it is not imported, it is not one)."""
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(value, pd.DataFrame)


def _extra(value: Any) -> Any:
    """Carried-through cells keep their value; missing ones become None so CSV and Parquet agree."""
    if value is None or _missing(value) or (isinstance(value, float) and math.isnan(value)):
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
    records = ([r[c] for c in columns] for r in frame.to_dict(orient="records"))
    jobs = _jobs(columns, records)
    jobs.extra_dtypes = {c: frame[c].dtype for c in columns if c not in JOB_COLUMNS}
    return jobs


def _jobs(columns: list[str], records: Iterable[Sequence[Any]]) -> Jobs:
    """Rows (cells in the order of `columns`, names from `_column_names`) as jobs."""
    if "prompt" not in columns and "image" not in columns:
        raise InputError("the jobs table needs a 'prompt' column (or 'image' for variations)")
    known = [(i, c) for i, c in enumerate(columns) if c in JOB_COLUMNS]
    extras = [(i, c) for i, c in enumerate(columns) if c not in JOB_COLUMNS]
    jobs = [
        Job(
            row=row,
            cells={c: _cell(record[i]) for i, c in known},
            extra={c: _extra(record[i]) for i, c in extras},
        )
        for row, record in enumerate(records, start=1)
    ]
    return Jobs(jobs)


def _read_csv(path: Path) -> Jobs:
    """Everything as text ("007" stays "007", ids never become floats). The header is read as
    a plain row, so duplicate names reach `_column_names` instead of being renamed `x.1`.
    Blank lines are skipped; a row shorter than the header has its missing cells empty, a
    longer one is an error naming it, as is a quote left open."""
    with path.open("rb") as f:
        head = f.read(8192)
    if b"\x00" in head:
        raise InputError(f"{path} is a binary file, not a CSV (or Parquet) jobs file")
    with path.open(encoding="utf-8-sig", newline="") as f:  # "\r\n" in a quoted cell stays
        text = f.read()
    records = _records(text, path)
    if not records:
        raise InputError(f"{path} is empty: a jobs file needs a header row")
    (_, header), data = records[0], records[1:]
    width = len(header)
    for row, (line, record) in enumerate(data, start=1):
        if len(record) > width:
            raise InputError(
                f"cannot read {path} as a jobs table: row {row} (line {line}) has "
                f"{len(record)} cells, the header {width}"
            )
        record.extend([""] * (width - len(record)))
    return _jobs(_column_names(header), (record for _, record in data))


def _records(text: str, path: Path) -> list[tuple[int, list[str]]]:
    """(last line number, cells) of every record that is not a blank line."""
    consumed: list[str] = []

    def lines() -> Iterator[str]:
        for line in io.StringIO(text, newline=""):
            consumed.append(line)
            yield line

    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(lines(), strict=True)
    records = []
    try:
        for record in reader:
            blank = not "".join(consumed).strip()
            consumed.clear()
            if not blank:
                records.append((reader.line_num, record))
    except csv.Error as exc:
        raise InputError(
            f"cannot read {path} as a jobs table: line {reader.line_num}: {exc}"
        ) from None
    return records


def read_jobs(source: str | Path | pd.DataFrame) -> Jobs:
    """Jobs from a CSV (UTF-8, BOM or not, quoted newlines allowed), a Parquet file or a DataFrame."""
    if not isinstance(source, (str, os.PathLike)):
        return jobs_from_frame(source)
    path = Path(source)
    if not path.is_file():
        what = "is a folder, not a jobs file" if path.is_dir() else "not found"
        raise InputError(f"jobs file {what}: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return _read_parquet(path)
        return _read_csv(path)
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
        ) from None
    except OSError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise InputError(f"cannot read {path} as a jobs table: {detail}") from None


def _read_parquet(path: Path) -> Jobs:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except (ValueError, OSError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise InputError(f"cannot read {path} as a jobs table: {detail}") from None
    return jobs_from_frame(frame)
