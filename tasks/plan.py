"""Planner: checked jobs become request units, each with stable keys.

Every requested image has a key derived only from what determines it: the operation, the
model, the parameters that shape the image, the prompt, the source image bytes, the job's
explicit id (if any) and the image index. Reordering or appending rows leaves the keys of
unchanged rows as they were, so a re-run finds its finished images by key.

Keys leave out `user` and `response_format` (they do not change the picture) and `n`
(how images are grouped into calls is a transport detail).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from imagebatch.tasks.validate import ValidJob

NOT_IN_KEY = {"user", "response_format"}
_UNSAFE = re.compile(r"[^a-z0-9._-]+")
# What safe_name appends; an id that already ends like this gets a suffix of its own, so
# `A B` (-> `a_b-<hash>`) and a literal `a_b-<hash>` never share a file name.
_HASHED = re.compile(r"-[0-9a-f]{8}$")
_WINDOWS_RESERVED = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}


def _hash(obj: object) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint(job: ValidJob) -> str:
    """What determines this job's images, as a hash (without the image index).

    Sources count by the sha256 of their file bytes (moving or renaming a file changes
    nothing) plus the preparation settings that shape the bytes sent (fit, padding, mask
    colour). Preparation is deterministic, so the same file and settings send the same bytes.
    """
    what: dict[str, object] = {
        "operation": job.operation,
        "params": {k: v for k, v in job.params.items() if k not in NOT_IN_KEY},
        "images": [s.sha256 for s in job.images],
        "mask": job.mask.sha256 if job.mask else None,
        "id": job.job.get("id") or None,
    }
    if job.prep is not None:
        what["prepare"] = job.prep.key()
    return _hash(what)


def image_key(job_fingerprint: str, occurrence: int, index: int) -> str:
    return _hash([job_fingerprint, occurrence, index])[:32]


def safe_name(job_id: str) -> str:
    """A file-name stem that is safe on any filesystem (lower case, so case-insensitive ones
    too) and one-to-one with ids: any id that is not already such a stem gets a hash of itself."""
    stem = _UNSAFE.sub("_", job_id.lower()).strip("._")[:80] or "job"
    if stem != job_id or stem in _WINDOWS_RESERVED or _HASHED.search(stem):
        stem = f"{stem}-{hashlib.sha256(job_id.encode('utf-8')).hexdigest()[:8]}"
    return stem


@dataclass(frozen=True)
class PlannedJob:
    job: ValidJob
    job_id: str
    keys: tuple[str, ...]  # one per image index
    file_stem: str = ""  # unique within the run; set by plan_jobs

    def image_stem(self, index: int) -> str:
        """`<file stem>_<index>`: the file name of one image, without its extension."""
        return f"{self.file_stem or safe_name(self.job_id)}_{index}"


@dataclass(frozen=True)
class RequestUnit:
    """One API call: `indices` of `planned` asked for together (len(indices) is the n sent)."""

    planned: PlannedJob
    indices: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.indices)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.planned.keys[i] for i in self.indices)

    @property
    def key(self) -> str:
        return _hash(list(self.keys))[:32]

    @property
    def label(self) -> str:
        """The call as a message names it (a cost cap's reason): model, quality, size."""
        params = self.planned.job.params
        parts = (self.planned.job.model.name, params.get("quality"), params.get("size"))
        return " ".join(str(p) for p in parts if p)


def plan_jobs(valid: Iterable[ValidJob]) -> list[PlannedJob]:
    """Give every job its id and image keys. Identical id-less rows are told apart by occurrence."""
    seen: dict[str, int] = {}
    stems: set[str] = set()
    planned = []
    for job in valid:
        fp = fingerprint(job)
        occurrence = seen.get(fp, 0) + 1
        seen[fp] = occurrence
        job_id = job.job_id or (f"j{fp[:12]}" if occurrence == 1 else f"j{fp[:12]}-{occurrence}")
        keys = tuple(image_key(fp, occurrence, i) for i in range(job.n))
        stem = safe_name(job_id)
        if stem in stems:  # an explicit id equal to another row's derived id: never share files
            stem = f"{stem}-{keys[0][:8]}"
        stems.add(stem)
        planned.append(PlannedJob(job, job_id, keys, stem))
    return planned


def units_for(planned: PlannedJob, pending: Iterable[int]) -> Iterator[RequestUnit]:
    """Split the pending image indices of one job into calls the model allows."""
    indices = sorted(pending)
    step = planned.job.model.max_n_per_call
    for start in range(0, len(indices), step):
        yield RequestUnit(planned, tuple(indices[start : start + step]))
