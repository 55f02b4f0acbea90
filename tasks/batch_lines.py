"""Batch lines: request units become JSONL request lines, split into input files.

A line is `{"custom_id", "method": "POST", "url", "body"}`. Its `custom_id` is derived from
the unit's image keys, so a result maps back to exactly the images it was for. Edits go as
the JSON edit form (a batch line cannot carry multipart): sources and mask as base64 data
URLs with their real MIME type. What the Batch API cannot carry is said, per unit, by
`refusal`.

Files are written as they are filled (never the whole set in memory) and cut before a line
would push one past `max_lines` or `max_bytes`; every file holds one endpoint, as a batch
serves one endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagebatch.tasks.files import fsync_dir
from imagebatch.tasks.plan import RequestUnit
from imagebatch.tasks.prepare import PreparedFile, PreparedInputs, SourceError, prepare_job

URLS = {"generate": "/v1/images/generations", "edit": "/v1/images/edits"}
# The JSON edit form (SPEC EditImageBodyJsonParam): sizes it takes, and fields it has not.
JSON_EDIT_SIZES = ("auto", "1024x1024", "1536x1024", "1024x1536")
NOT_IN_JSON_EDIT = ("response_format", "style")
DATA_URL_MAX = 20_971_520  # SPEC ImageRefParam.image_url maxLength


def custom_id(unit: RequestUnit) -> str:
    """Stable for the unit's image keys: the same images always get the same id."""
    return "ib-" + unit.key


def refusal(unit: RequestUnit) -> str | None:
    """Why this unit cannot go in a batch line, or None when it can."""
    job = unit.planned.job
    spec = job.model
    if job.operation == "variation":
        return "variations are not served by the Batch API"
    if not spec.batch:
        return f"{spec.name} is marked batch = false in the model registry"
    if job.operation == "edit":
        if not spec.is_gpt_image:
            return f"{spec.name} edits need multipart, which a batch line cannot carry"
        size = str(job.params.get("size") or "auto")
        if size not in JSON_EDIT_SIZES:
            return f"the JSON edit form (the only one a batch takes) has no size {size}"
    return None


def _data_url(f: PreparedFile) -> str:
    return f"data:{f.mime};base64,{base64.b64encode(f.data).decode('ascii')}"


def body(unit: RequestUnit, inputs: PreparedInputs | None = None) -> dict[str, Any]:
    """The request body, as the live client would send it, in JSON form. Edits carry the
    same prepared source bytes a live call would send, as data URLs."""
    job = unit.planned.job
    params: dict[str, Any] = {k: v for k, v in job.params.items() if v is not None}
    params["n"] = unit.n
    if job.operation == "edit":
        inputs = inputs if inputs is not None else prepare_job(job)
        if inputs is None:
            raise SourceError("an edit without source images")
        for name in NOT_IN_JSON_EDIT:
            params.pop(name, None)
        params["images"] = [{"image_url": _data_url(f)} for f in inputs.images]
        if inputs.mask is not None:
            params["mask"] = {"image_url": _data_url(inputs.mask)}
        too_big = [
            f.name
            for f in [*inputs.images, *filter(None, [inputs.mask])]
            if 4 * -(-len(f.data) // 3) + 40 > DATA_URL_MAX
        ]
        if too_big:
            raise SourceError(
                f"{too_big[0]} is too large for a data URL ({DATA_URL_MAX:,} characters)"
            )
    return params


def line(unit: RequestUnit, inputs: PreparedInputs | None = None) -> bytes:
    record = {
        "custom_id": custom_id(unit),
        "method": "POST",
        "url": URLS[unit.planned.job.operation],
        "body": body(unit, inputs),
    }
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


@dataclass
class InputFile:
    """One JSONL input file, written under the output folder; one batch each."""

    name: str
    endpoint: str
    path: Path
    tmp: Path
    lines: int = 0
    bytes: int = 0
    sha256: str = ""
    # custom_id -> [[image key, job id, file stem, image index], ...]
    units: dict[str, list[list[Any]]] = field(default_factory=dict)


class _Writer:
    def __init__(self, folder: Path, name: str, endpoint: str) -> None:
        self.tmp = folder / f".tmp-{name}.jsonl"
        self.file = InputFile(name, endpoint, folder / f"{name}.jsonl", self.tmp)
        self.handle = self.tmp.open("wb")
        self.hash = hashlib.sha256()

    def add(self, unit: RequestUnit, data: bytes) -> None:
        self.handle.write(data)
        self.hash.update(data)
        self.file.lines += 1
        self.file.bytes += len(data)
        p = unit.planned
        self.file.units[custom_id(unit)] = [
            [p.keys[i], p.job_id, p.file_stem, i] for i in unit.indices
        ]

    def close(self) -> InputFile:
        """Durable under its temporary name; `publish` gives it its name once recorded."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.file.sha256 = self.hash.hexdigest()
        return self.file


def write_input_files(
    units: Iterable[RequestUnit], folder: Path, prefix: str, max_lines: int, max_bytes: int
) -> tuple[list[InputFile], list[tuple[RequestUnit, str]]]:
    """Write units as JSONL files of at most `max_lines` lines and `max_bytes` bytes.

    Returns the files (durable on disk under a temporary name: `publish` each once the
    ledger records it, so a file under its own name is always one the ledger knows) and
    the units refused with the reason (a line
    alone larger than `max_bytes`, a source that cannot be prepared or is too large for a
    data URL)."""
    folder.mkdir(parents=True, exist_ok=True)
    files: list[InputFile] = []
    refused: list[tuple[RequestUnit, str]] = []
    open_writers: dict[str, _Writer] = {}
    count = 0
    # One preparation per job, not per unit (a job's units come together); only the last
    # job's is kept, so memory does not grow with the number of edits.
    prepared: tuple[int, PreparedInputs | None] = (0, None)
    for unit in units:
        job = unit.planned.job
        endpoint = URLS[job.operation]
        try:
            if job.operation == "edit" and prepared[0] != id(unit.planned):
                prepared = (id(unit.planned), prepare_job(job))
            data = line(unit, prepared[1] if job.operation == "edit" else None)
        except SourceError as exc:
            refused.append((unit, str(exc)))
            continue
        if len(data) > max_bytes:
            refused.append(
                (
                    unit,
                    f"its batch line is {len(data):,} bytes, over the {max_bytes:,} byte file limit",
                )
            )
            continue
        writer = open_writers.get(endpoint)
        if writer is not None and (
            writer.file.lines + 1 > max_lines or writer.file.bytes + len(data) > max_bytes
        ):
            files.append(writer.close())
            writer = None
        if writer is None:
            count += 1
            writer = open_writers[endpoint] = _Writer(folder, f"{prefix}-{count:03d}", endpoint)
        writer.add(unit, data)
    files.extend(w.close() for w in open_writers.values() if w.file.lines)
    for w in open_writers.values():
        if not w.file.lines:
            w.handle.close()
            w.tmp.unlink(missing_ok=True)
    return files, refused


def publish(f: InputFile) -> None:
    """Give a recorded input file its name (durably)."""
    os.replace(f.tmp, f.path)
    fsync_dir(f.path.parent)
