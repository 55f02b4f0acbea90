"""Dataset metadata: `metadata.jsonl` in the Hugging Face ImageFolder convention.

One line per succeeded image, `file_name` relative to the run folder (`images/...`), then the
prompt, revised prompt, settings and carried-through columns, so
`datasets.load_dataset("imagefolder", data_dir=DIR)` gives one row per succeeded image with
those columns. Since datasets 3.4 the metadata file lists the examples, so thumbs/ and
superseded/ are not picked up as extra images; older versions refuse a folder with images
the metadata does not list.

Every line has the same keys and each key one JSON type (text, or integers for the
numbers), because the loader infers one Arrow type per column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imagebatch.tasks.files import write_atomic
from imagebatch.tasks.gallery import json_cell, safe_relative
from imagebatch.tasks.manifest import Manifest

METADATA_NAME = "metadata.jsonl"
TEXT_COLUMNS = [
    "job_id",
    "operation",
    "model",
    "prompt",
    "revised_prompt",
    "size",
    "quality",
    "style",
    "background",
    "output_format",
    "sha256",
]
INT_COLUMNS = ["row", "image_index", "width", "height"]
# Names the loader gives a meaning of its own; a carried-through column so named is renamed.
RESERVED = {"file_name", "image", "label"}


def column_names(extra: list[str]) -> dict[str, str]:
    """Manifest column -> metadata key, carried-through columns last (renamed if they clash)."""
    names = {c: c for c in ["job_id", "row", "image_index", *TEXT_COLUMNS[1:], *INT_COLUMNS[2:]]}
    for col in extra:
        key = col
        while key in RESERVED or key in names.values():
            key = f"extra_{key}"
        names[col] = key
    return names


def _text(value: Any) -> str | None:
    value = json_cell(value)
    return None if value is None else str(value)


def _int(value: Any) -> int | None:
    value = json_cell(value)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def metadata_lines(manifest: Manifest, extra: list[str]) -> list[str]:
    """The JSONL lines for the succeeded rows that name a file under images/."""
    names = column_names([c for c in extra if c in manifest.columns])
    lines = []
    for record in manifest.with_status("succeeded"):
        file = safe_relative(json_cell(record.get("file")), "images")
        if file is None:
            continue
        line: dict[str, Any] = {"file_name": file}
        for col, key in names.items():
            value = record.get(col)
            line[key] = _int(value) if col in INT_COLUMNS else _text(value)
        text = json.dumps(line, ensure_ascii=False)
        # Line separators stay escaped: tools that split lines on them would cut a record.
        lines.append(text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    return lines


def write_metadata(out_dir: Path, manifest: Manifest, extra: list[str]) -> Path:
    """Write `metadata.jsonl` atomically; returns its path."""
    lines = metadata_lines(manifest, extra)
    path = out_dir / METADATA_NAME
    write_atomic(path, "".join(line + "\n" for line in lines).encode("utf-8"))
    return path
