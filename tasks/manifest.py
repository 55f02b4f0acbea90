"""Manifest: one row per requested image, rebuilt from the journal at the end of every run.

Rows follow the input order (row, then image index). Unknown input columns are carried
through after the fixed ones, so a catalog's SKU travels with its images.

The manifest is plain rows (`Manifest`), not a DataFrame: a run of a CSV never imports
pandas (about 100 MB) and imports pyarrow only to write manifest.parquet, after the last
image. The files are what pandas wrote before, byte for byte for the CSV, the same schema
and pandas metadata for the Parquet. A DataFrame is made only for who asks for one
(`Manifest.to_frame`, the Python API), and carried-through columns of a DataFrame input,
whose values can be any pandas type, are written through pandas as before.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagebatch.tasks.files import write_atomic
from imagebatch.tasks.journal import ImageRecord
from imagebatch.tasks.plan import PlannedJob
from imagebatch.tasks.read_jobs import Job
from imagebatch.tasks.validate import Problem, whole_number

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = [
    "job_id",
    "row",
    "image_index",
    "operation",
    "model",
    "prompt",
    "revised_prompt",
    "size",
    "quality",
    "style",
    "background",
    "output_format",
    "input_files",
    "input_mask",
    "input_preparation",
    "input_sha256",
    "input_mask_sha256",
    "status",
    "error_code",
    "error_message",
    "file",
    "sha256",
    "width",
    "height",
    "attempts",
    "ambiguous_retries",
    "request_id",
    "input_tokens",
    "output_tokens",
    "call_images",
    "call_text_tokens",
    "call_image_tokens",
    "call_output_tokens",
    "cost_usd",
    "estimated_usd",
    "transport",
    "batch_id",
    "key",
]
# Manifest columns taken as they are from the image's journal record (its identity, job_id
# and key, comes from the plan).
FROM_RECORD = tuple(
    c for c in COLUMNS if c in {f.name for f in fields(ImageRecord)} - {"job_id", "key"}
)
STATUSES = ("succeeded", "failed", "rejected", "invalid", "not_run")
INT_COLUMNS = (
    "row",
    "image_index",
    "width",
    "height",
    "attempts",
    "ambiguous_retries",
    "call_images",
    "call_text_tokens",
    "call_image_tokens",
    "call_output_tokens",
)
# Numbers that pandas typed by their values: integers if every row has one, else floats.
NUMBER_COLUMNS = ("input_tokens", "output_tokens", "cost_usd", "estimated_usd")


def _invalid_n(job: Job) -> int:
    n = whole_number(job.get("n") or "1")
    return n if n is not None and 1 <= n <= 100 else 1


def build_rows(
    jobs: list[Job],
    planned: dict[int, PlannedJob],
    invalid: dict[int, list[Problem]],
    records: dict[str, ImageRecord],
) -> list[dict[str, Any]]:
    """Every requested image of every input row, in input order."""
    rows: list[dict[str, Any]] = []
    for job in jobs:
        plan = planned.get(job.row)
        base = {
            "row": job.row,
            "operation": job.get("operation") or None,
            "model": job.get("model") or None,
            "prompt": job.get("prompt") or None,
            "size": job.get("size") or None,
            "quality": job.get("quality") or None,
            "style": job.get("style") or None,
            "background": job.get("background") or None,
            "output_format": job.get("output_format") or None,
            # the source files as the row names them (relative to the jobs file)
            "input_files": job.get("image") or None,
            "input_mask": job.get("mask") or None,
        }
        if plan is None:
            message = "; ".join(str(p) for p in invalid.get(job.row, []))
            for index in range(_invalid_n(job)):
                rows.append(
                    {
                        **base,
                        "job_id": job.get("id") or None,
                        "image_index": index,
                        "status": "invalid",
                        "error_code": "invalid_input",
                        "error_message": message,
                        **carried(job.extra),
                    }
                )
            continue
        vj = plan.job
        base.update(
            operation=vj.operation,
            model=vj.model.name,
            size=vj.params.get("size"),
            quality=vj.params.get("quality"),
            style=vj.params.get("style"),
            background=vj.params.get("background"),
            output_format=vj.params.get("output_format"),
        )
        for index, key in enumerate(plan.keys):
            rec = records.get(key)
            row = {**base, "job_id": plan.job_id, "image_index": index, "key": key}
            if rec is None:
                row["status"] = "not_run"
            else:
                row.update({name: getattr(rec, name) for name in FROM_RECORD})
                if rec.status != "not_run":
                    row["transport"] = "batch" if rec.batch_id else "live"
            row.update(carried(job.extra))
            rows.append(row)
    return rows


def carried_names(extra_columns: Iterable[str]) -> dict[str, str]:
    """Manifest name of each carried-through column: a name the manifest already uses
    (`status`, `width`, `file`, in any case) is carried as `input_<name>`, never over it."""
    taken = {c.lower() for c in COLUMNS}
    names: dict[str, str] = {}
    for col in extra_columns:
        name = col
        while name.lower() in taken:
            name = f"input_{name}"
        taken.add(name.lower())
        names[col] = name
    return names


def carried(extra: dict[str, Any]) -> dict[str, Any]:
    names = carried_names(extra)
    return {names[k]: v for k, v in extra.items()}


@dataclass
class Manifest:
    """The manifest as plain rows: `columns` in file order, each row a dict by column name
    (a column a row lacks is missing). `extra_dtypes`: the dtype of each carried-through
    column when the jobs came from a DataFrame (by manifest name)."""

    columns: list[str]
    rows: list[dict[str, Any]]
    extra_dtypes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        rows: list[dict[str, Any]],
        extra_columns: list[str],
        extra_dtypes: dict[str, Any] | None = None,
    ) -> Manifest:
        """The run's manifest from `build_rows`; `extra_columns` by their input names."""
        names = carried_names(extra_columns)
        dtypes = {names[c]: d for c, d in (extra_dtypes or {}).items() if c in names}
        return cls(COLUMNS + [names[c] for c in extra_columns], rows, dtypes)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def extra(self) -> list[str]:
        """The carried-through columns: whatever the manifest has beyond the fixed ones."""
        return [c for c in self.columns if c not in COLUMNS]

    def column(self, name: str) -> list[Any]:
        return [row.get(name) for row in self.rows]

    def with_status(self, status: str, keep: bool = True) -> list[dict[str, Any]]:
        """The rows whose status is (keep) or is not (keep=False) `status`."""
        return [row for row in self.rows if (row.get("status") == status) is keep]

    def to_frame(self) -> pd.DataFrame:
        """The manifest as a DataFrame, typed as manifest.parquet is (imports pandas)."""
        import pandas as pd

        frame = pd.DataFrame(self.rows, columns=self.columns)
        for col in INT_COLUMNS:
            frame[col] = pd.array(frame[col], dtype="Int64")
        for col in NUMBER_COLUMNS:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
        for col, dtype in self.extra_dtypes.items():
            if col in frame.columns:
                frame[col] = _restore_dtype(frame[col], dtype)
        return frame


def _restore_dtype(column: pd.Series, dtype: Any) -> pd.Series:
    """Carried-through columns keep the input's dtype where it has one that survives
    missing values (an integer SKU stays integer, never `1001.0`)."""
    import pandas as pd

    try:
        if pd.api.types.is_bool_dtype(dtype):
            return column.astype("boolean")
        if pd.api.types.is_integer_dtype(dtype):
            return column.astype("Int64" if dtype.kind == "i" else "UInt64")
        if pd.api.types.is_float_dtype(dtype) or pd.api.types.is_datetime64_any_dtype(dtype):
            return column.astype(dtype)
    except (TypeError, ValueError, OverflowError):
        pass
    return column


# Columns whose text comes from the server (or is built from it).
SERVER_TEXT = ("revised_prompt", "error_code", "error_message", "request_id")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """Server text for a spreadsheet: no control characters, and a cell that would start a
    formula (`=`, `+`, `-`, `@`) gets a leading apostrophe so it shows as text."""
    if not isinstance(value, str):
        return value
    text = _CONTROL.sub("", value)
    if text.startswith(_FORMULA_START):
        text = "'" + text
    return text


def write_manifest(
    manifest: Manifest, out_dir: Path, formats: Iterable[str] = ("csv", "parquet")
) -> list[Path]:
    """Write manifest.csv / manifest.parquet atomically; returns the paths written."""
    frame = manifest.to_frame() if manifest.extra_dtypes else None
    written = []
    for fmt in formats:
        path = out_dir / f"manifest.{fmt}"
        if fmt == "csv":
            data = _csv_of_frame(frame) if frame is not None else csv_bytes(manifest)
        elif fmt == "parquet":
            data = _parquet_of_frame(frame) if frame is not None else parquet_bytes(manifest)
        else:
            continue
        write_atomic(path, data)
        written.append(path)
    return written


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _whole_numbers(values: list[Any]) -> bool:
    """pandas' `to_numeric` keeps a column integer only when every value is an integer."""
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _text(value: Any) -> str:
    return "" if _missing(value) else str(value)


def _formatters(manifest: Manifest) -> list[Callable[[Any], str]]:
    """How each column's cells are written, as pandas' `to_csv` wrote the typed frame:
    integers plainly, floats by their shortest repr (`1.0`), missing values empty."""
    out: list[Callable[[Any], str]] = []
    for col in manifest.columns:
        if col in INT_COLUMNS or (col in NUMBER_COLUMNS and _whole_numbers(manifest.column(col))):
            out.append(lambda v: "" if _missing(v) else str(int(v)))
        elif col in NUMBER_COLUMNS:
            out.append(lambda v: "" if _missing(v) else repr(float(v)))
        elif col in SERVER_TEXT:
            out.append(lambda v: _text(csv_safe(v)))
        else:
            out.append(_text)
    return out


def csv_bytes(manifest: Manifest) -> bytes:
    """manifest.csv: the bytes pandas' `to_csv(index=False)` wrote for the same manifest."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(manifest.columns)
    cells = list(zip(manifest.columns, _formatters(manifest)))
    writer.writerows([fmt(row.get(col)) for col, fmt in cells] for row in manifest.rows)
    return buf.getvalue().encode("utf-8")


def _arrow_column(manifest: Manifest, col: str) -> tuple[str, list[Any], dict[str, Any]]:
    """(arrow type name, values, pandas metadata) of one column, as pandas typed it: nullable
    integers, numbers, text (a column with no value at all is Arrow's null type)."""
    values = [None if _missing(v) else v for v in manifest.column(col)]
    if col in INT_COLUMNS:
        kind, pandas_type, numpy_type = "int64", "int64", "Int64"
        values = [None if v is None else int(v) for v in values]
    elif col in NUMBER_COLUMNS and _whole_numbers(values):
        kind, pandas_type, numpy_type = "int64", "int64", "int64"
    elif col in NUMBER_COLUMNS:
        kind, pandas_type, numpy_type = "float64", "float64", "float64"
        values = [None if v is None else float(v) for v in values]
    elif all(v is None for v in values):
        # pandas gave a column with no value an object dtype when every row had the key
        # (None), a float one when some row lacked it (NaN)
        if all(col in row for row in manifest.rows):
            kind, pandas_type, numpy_type = "null", "empty", "object"
        else:
            kind, pandas_type, numpy_type = "float64", "float64", "float64"
    else:
        kind, pandas_type, numpy_type = "large_string", "object", "str"
        values = [None if v is None else str(v) for v in values]
    meta = {
        "name": col,
        "field_name": col,
        "pandas_type": pandas_type,
        "numpy_type": numpy_type,
        "metadata": None,
    }
    return kind, values, meta


def parquet_bytes(manifest: Manifest) -> bytes:
    """manifest.parquet with the schema and pandas metadata `DataFrame.to_parquet` gave the
    same manifest (so pandas reads back nullable integers); imports pyarrow only now.

    The table is read from JSON lines with an explicit schema: building arrays from Python
    lists (`pa.array`) would make pyarrow import pandas to check for pandas objects."""
    import pyarrow as pa
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    fields_, columns, columns_meta = [], {}, []
    for col in manifest.columns:
        kind, values, meta = _arrow_column(manifest, col)
        fields_.append(pa.field(col, getattr(pa, kind)()))
        columns[col] = values
        columns_meta.append(meta)
    pandas_meta = {
        "index_columns": [],
        "column_indexes": [],
        "columns": columns_meta,
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": _version("pandas"),
    }
    schema = pa.schema(fields_, metadata={"pandas": json.dumps(pandas_meta)})
    lines = [
        json.dumps(dict(zip(columns, cells)), allow_nan=False).encode("ascii")
        for cells in zip(*columns.values())
    ]
    if lines:
        table = pa_json.read_json(
            io.BytesIO(b"\n".join(lines)),
            read_options=pa_json.ReadOptions(block_size=max(1 << 20, 2 * max(map(len, lines)))),
            parse_options=pa_json.ParseOptions(explicit_schema=schema),
        ).replace_schema_metadata(schema.metadata)
    else:
        table = schema.empty_table()
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "0"


def _csv_of_frame(frame: pd.DataFrame) -> bytes:
    shown = frame.copy()
    for col in SERVER_TEXT:
        if col in shown.columns:
            shown[col] = shown[col].map(csv_safe)
    return shown.to_csv(index=False).encode("utf-8")


def _parquet_of_frame(frame: pd.DataFrame) -> bytes:
    """A DataFrame input's carried-through columns can mix types across rows: those are
    stored as text."""
    buf = io.BytesIO()
    safe = frame.copy()
    for col in safe.columns:
        if safe[col].dtype == object:
            safe[col] = safe[col].map(lambda v: None if _missing(v) else str(v))
    safe.to_parquet(buf, index=False)
    return buf.getvalue()
