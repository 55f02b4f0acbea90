"""Journal: an append-only JSONL file of per-image outcomes, the run's durable memory.

A line is written only after the image file it names is durable, so "the journal says
succeeded" implies "the file was on disk". Lines go out in batches (group commit): the
images folder is fsynced, the lines are appended on an O_APPEND descriptor, the journal is
fsynced, and only then are the writers told their record is safe. A crash can leave at
most a torn last line, which `load` skips. The last line for a key wins. Plain JSONL (not SQLite) because it is trivially
inspectable (`tail -f`, `jq`), needs no schema, and appends are all the run ever does.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any

from imagebatch.tasks.errors import OutputError
from imagebatch.tasks.files import fsync_dir

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
    input_tokens: float | None = None  # this image's share of the call's usage
    output_tokens: float | None = None
    # Edits and variations: what was sent (sha256 of the prepared bytes) and how it was made.
    input_sha256: str | None = None  # one per source image, "|"-separated
    input_mask_sha256: str | None = None
    input_preparation: str | None = None
    call_images: int | None = None  # images the call that made this one returned
    call_text_tokens: int | None = None  # the call's usage as reported (whole call)
    call_image_tokens: int | None = None
    call_output_tokens: int | None = None
    cost_usd: float | None = None  # this image's share of the call's price; None: unknown
    estimated_usd: float | None = None  # its share of the estimate before sending
    possibly_paid_usd: float = 0.0  # worst case of its requests lost after sending
    run_id: str | None = None
    batch_id: str | None = None  # the Batch API batch that made it (None: sent live)
    # Where the bytes were when this line was written, if not yet at `file` (staged, or being
    # moved to or from superseded/): the next run finishes the move instead of paying again.
    moved_from: str | None = None
    finished_at: float = field(default_factory=time.time)


def _amount(value: Any) -> Decimal | None:
    """A journal amount as the decimal it was written as (sums of 0.01 stay exact)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    amount = Decimal(repr(value))
    return amount if amount.is_finite() and amount >= 0 else None


def _encode(record: ImageRecord) -> bytes:
    return (json.dumps(asdict(record), ensure_ascii=False, separators=(",", ":")) + "\n").encode(
        "utf-8"
    )


class Journal:
    def __init__(self, out_dir: Path, sync_first: tuple[Path, ...] = ()) -> None:
        """`sync_first`: folders fsynced before each batch of lines, so a recorded image's
        rename is as durable as its record."""
        self.path = out_dir / JOURNAL_NAME
        self.sync_first = sync_first
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._failed = False
        self._pending: list[tuple[bytes, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

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

    def spent(self) -> tuple[Decimal, int]:
        """What every run into this folder was billed, or may have been (lost requests at
        their worst case): the sum over every line, since a redone image was paid again.
        Also returns how many succeeded lines carry no price (unknown, not counted)."""
        total, unknown = Decimal(0), 0
        for data in self._lines():
            cost, lost = _amount(data.get("cost_usd")), _amount(data.get("possibly_paid_usd"))
            if cost is None and data.get("status") == "succeeded":
                unknown += 1
            total += (cost or 0) + (lost or 0)
        return total, unknown

    def _lines(self) -> Iterator[dict[str, Any]]:
        self._refuse_symlink()
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

    def _refuse_symlink(self) -> None:
        if self.path.is_symlink():
            raise OutputError(
                f"{self.path} is a symbolic link; imagebatch keeps its journal only inside the "
                "output folder. Replace it with the real file or use another --out"
            )

    def open(self) -> None:
        self._refuse_symlink()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise OutputError(
                f"cannot open the journal {self.path}: {exc.strerror or exc}"
            ) from None
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
        """Write one record durably, now (blocking)."""
        self._write_lines([_encode(record)])

    async def record(self, record: ImageRecord) -> None:
        """Write one record durably; concurrent callers share one fsync (group commit).

        One fsync per image capped a run at about 1/fsync-latency images a second (about 30
        here); a batch costs one fsync of the images folder (making its renames durable) and
        one of the journal, however many records it holds."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((_encode(record), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        await asyncio.shield(future)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write_lines, [line for line, _ in batch])
            except OutputError as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    def _write_lines(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        with self._lock:
            if self._fd is None:
                raise OutputError("the journal is not open")
            if self._failed:
                # After a failed write the file may end in a partial line; never glue onto it.
                raise OutputError(
                    f"the journal {self.path} could not be written earlier in this run"
                )
            try:
                for folder in self.sync_first:
                    fsync_dir(folder)
                view = memoryview(data)
                while view:  # a nearly full disk may take part of a write without an error
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
