"""Manifest: one row per requested image, rebuilt from the journal at the end of every run.

Rows follow the input order (row, then image index). Unknown input columns are carried
through after the fixed ones, so a catalog's SKU travels with its images.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd

from imagebatch.tasks.files import write_atomic
from imagebatch.tasks.journal import ImageRecord
from imagebatch.tasks.plan import PlannedJob
from imagebatch.tasks.read_jobs import Job
from imagebatch.tasks.validate import Problem, whole_number

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


def to_frame(
    rows: Iterable[dict[str, Any]],
    extra_columns: list[str],
    extra_dtypes: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """The manifest table; carried-through columns keep the input's dtype where it has one
    that survives missing values (an integer SKU stays integer, never `1001.0`)."""
    names = carried_names(extra_columns)
    frame = pd.DataFrame(list(rows), columns=COLUMNS + [names[c] for c in extra_columns])
    for col in INT_COLUMNS:
        frame[col] = pd.array(frame[col], dtype="Int64")
    for col in ("input_tokens", "output_tokens", "cost_usd", "estimated_usd"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    for col, dtype in (extra_dtypes or {}).items():
        if col in names:
            frame[names[col]] = _restore_dtype(frame[names[col]], dtype)
    return frame


def _restore_dtype(column: pd.Series, dtype: Any) -> pd.Series:
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
    frame: pd.DataFrame, out_dir: Path, formats: Iterable[str] = ("csv", "parquet")
) -> list[Path]:
    """Write manifest.csv / manifest.parquet atomically; returns the paths written."""
    written = []
    for fmt in formats:
        path = out_dir / f"manifest.{fmt}"
        if fmt == "csv":
            shown = frame.copy()
            for col in SERVER_TEXT:
                if col in shown.columns:
                    shown[col] = shown[col].map(csv_safe)
            data = shown.to_csv(index=False).encode("utf-8")
        elif fmt == "parquet":
            buf = io.BytesIO()
            # Carried-through columns can mix types across rows; store those as text.
            safe = frame.copy()
            for col in safe.columns:
                if safe[col].dtype == object:
                    safe[col] = safe[col].map(
                        lambda v: (
                            None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)
                        )
                    )
            safe.to_parquet(buf, index=False)
            data = buf.getvalue()
        else:
            continue
        write_atomic(path, data)
        written.append(path)
    return written
