"""Journal: an append-only JSONL file of per-image outcomes, the run's durable memory.

A line is written only after the image file it names is durable, so "the journal says
succeeded" implies "the file was on disk". Each line is one `os.write` on an O_APPEND
descriptor followed by fsync; a crash can leave at most a torn last line, which `load`
skips. The last line for a key wins. Plain JSONL (not SQLite) because it is trivially
inspectable (`tail -f`, `jq`), needs no schema, and appends are all the run ever does.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from tasks.errors import OutputError

JOURNAL_NAME = "journal.jsonl"


@dataclass
class ImageRecord:
    key: str
    job_id: str
    index: int
    status: str  # succeeded | failed | rejected | not_run
    file: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    revised_prompt: str | None = None
    attempts: int = 0
    request_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    ambiguous_retries: int = 0
    input_tokens: float | None = None
    output_tokens: float | None = None
    run_id: str | None = None
    finished_at: float = field(default_factory=time.time)


class Journal:
    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / JOURNAL_NAME
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._failed = False

    def load(self) -> dict[str, ImageRecord]:
        """The latest record per key. Torn or unreadable lines are skipped."""
        records: dict[str, ImageRecord] = {}
        known = {f.name for f in fields(ImageRecord)}
        for data in self._lines():
            try:
                # Fields this version does not know (a newer writer) are dropped, not fatal.
                rec = ImageRecord(**{k: v for k, v in data.items() if k in known})
            except TypeError:
                continue
            records[rec.key] = rec
        return records

    def _lines(self) -> Iterator[dict[str, Any]]:
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return
        with f:
            for raw in f:
                try:
                    data = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(data, dict):
                    yield data

    def open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot open the journal {self.path}: {exc.strerror or exc}") from None
        # A torn last line from a crash would glue onto the next record: start on a fresh line.
        try:
            size = self.path.stat().st_size
            if size:
                with self.path.open("rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        os.write(self._fd, b"\n")
        except OSError:
            pass

    def append(self, record: ImageRecord) -> None:
        line = (json.dumps(asdict(record), ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            if self._fd is None:
                raise OutputError("the journal is not open")
            if self._failed:
                # After a failed write the file may end in a partial line; never glue onto it.
                raise OutputError(f"the journal {self.path} could not be written earlier in this run")
            try:
                view = memoryview(line)
                while view:  # a nearly full disk may take part of a line without an error
                    written = os.write(self._fd, view)
                    if written <= 0:
                        raise OSError(errno.ENOSPC, "short write")
                    view = view[written:]
                os.fsync(self._fd)
            except OSError as exc:
                self._failed = True
                what = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
                raise OutputError(f"cannot write the journal {self.path}: {what}") from None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
