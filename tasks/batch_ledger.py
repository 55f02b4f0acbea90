"""Batch ledger: what was submitted to the Batch API, durable before the next step.

`batches.jsonl` sits beside the journal. Each step appends one fsynced event, and the step
after it starts only once that event is on disk:

    part      an input file is written (its lines, and the image keys each line carries)
    uploaded  the file was uploaded: its file id. This is the intent to create a batch: a
              run killed between `POST /batches` and the next event finds its batch again
              by listing batches for this input file id, so it never creates a second one
    created   the batch id
    collected every line of the batch's output and error files is in the journal
    dropped   the part will never be submitted (upload refused); its images are free again

A run killed anywhere is picked up by rerunning the same command: parts without a file id
are dropped and their images planned again (an uploaded orphan file costs nothing),
uploaded parts are adopted or created, created batches are polled, never resubmitted.
Torn last lines are skipped, as in the journal.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagebatch.tasks.errors import OutputError

LEDGER_NAME = "batches.jsonl"
BATCH_DIR = "batch"


@dataclass
class Part:
    name: str
    endpoint: str
    file: str  # relative to the output folder
    lines: int
    bytes: int
    sha256: str
    units: dict[str, list[list[Any]]]  # custom_id -> [[key, job_id, stem, index], ...]
    round: int = 1
    at: float = 0.0
    file_id: str | None = None
    uploaded_at: float | None = None
    batch_id: str | None = None
    status: str | None = None  # the batch's last status seen
    collected: bool = False
    dropped: str | None = None

    @property
    def open(self) -> bool:
        """Still to be submitted, waited for or collected."""
        return not self.collected and self.dropped is None

    def image_keys(self) -> set[str]:
        return {image[0] for images in self.units.values() for image in images}


@dataclass
class Ledger:
    out_dir: Path
    parts: dict[str, Part] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.out_dir / LEDGER_NAME

    @classmethod
    def load(cls, out_dir: Path) -> Ledger:
        ledger = cls(out_dir)
        try:
            f = ledger.path.open("rb")
        except FileNotFoundError:
            return ledger
        with f:
            for raw in f:
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    ledger._apply(event)
        return ledger

    def _apply(self, e: dict[str, Any]) -> None:
        kind, name = e.get("event"), str(e.get("part"))
        if kind == "part":
            self.parts[name] = Part(
                name,
                e["endpoint"],
                e["file"],
                e["lines"],
                e["bytes"],
                e["sha256"],
                e["units"],
                e.get("round", 1),
                e.get("at", 0.0),
            )
            return
        part = self.parts.get(name)
        if part is None:
            return
        if kind == "uploaded":
            part.file_id, part.uploaded_at = e["file_id"], e.get("at")
        elif kind == "created":
            part.batch_id = e["batch_id"]
            part.status = e.get("status")
        elif kind == "status":
            part.status = e.get("status")
        elif kind == "collected":
            part.collected, part.status = True, e.get("status")
        elif kind == "dropped":
            part.dropped = e.get("reason") or "dropped"

    def record(self, event: dict[str, Any]) -> None:
        """Append one event and fsync it; then apply it."""
        event = {**event, "at": event.get("at", time.time())}
        data = (json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if self.path.stat().st_size and not _ends_with_newline(self.path):
                    data = b"\n" + data  # never glue onto a torn line
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(
                f"cannot write the batch ledger {self.path}: {exc.strerror or exc}"
            ) from None
        self._apply(event)

    def open_parts(self) -> list[Part]:
        return [p for p in self.parts.values() if p.open]


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
