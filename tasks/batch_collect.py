"""Batch collection: a finished batch's output and error files become images and journal lines.

Files are downloaded to disk first (they can be gigabytes), then read one line at a time; a
few lines are in flight at once, so memory holds a handful of lines whatever the file's
size. Each image takes the live path: check, staged write, journal line, then the rename
into images/. Error lines become `failed` or `rejected` with the server's code and message,
classified exactly as live errors are; a line a retry may fix (a 5xx, a malformed answer) is
handed back for another round instead. Lines the batch never ran (expired, cancelled) leave
their images `not_run` with that reason, in memory only, so the next run submits them again.
"""

from __future__ import annotations

import asyncio
import binascii
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pybase64

from imagebatch.tasks.batch_ledger import Part
from imagebatch.tasks.errors import ApiError, RejectedError, TransientError
from imagebatch.tasks.journal import ImageRecord, Journal
from imagebatch.tasks.redact import scrub
from imagebatch.tasks.retry import error_from_response, redact
from imagebatch.tasks.store import (
    CorruptImage,
    Expected,
    ImageStore,
    StoredImage,
    UnexpectedImage,
    run_off_loop,
)

IN_FLIGHT_LINES = 4
NOT_RUN_REASONS = {
    "expired": ("batch_expired", "the batch's 24-hour window ended before this request ran"),
    "cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
    "failed": ("batch_failed", "the batch failed validation"),
}

_ANY = object()  # `_succeeded`: made by any call, live or batch
Download = Callable[[str], Awaitable[bytes | bytearray]]


@dataclass
class Collected:
    """What one batch's files gave: per-image outcomes, and the units to send again."""

    records: list[ImageRecord] = field(default_factory=list)
    retry: dict[str, list[list[Any]]] = field(default_factory=dict)  # custom_id -> images
    not_run: list[ImageRecord] = field(default_factory=list)
    round: int = 1  # the batch round: an image's attempts so far


@dataclass
class Collector:
    store: ImageStore
    journal: Journal
    run_id: str
    download: Download  # fetches a `url` image (DALL·E) at once, without our credentials
    done: dict[str, ImageRecord]  # the journal's records: images already succeeded are skipped
    on_record: Callable[[ImageRecord], None] | None = None
    # (custom_id, the line's images, how many it returned, usage) -> each image's cost fields
    pricer: Callable[[str, list[list[Any]], int, dict[str, Any] | None], dict[str, Any]] | None = (
        None
    )
    # image key -> the format and size its request asked for (None: anything goes)
    expect: Callable[[str], Expected | None] | None = None
    secrets: tuple[str, ...] = ()  # masked in every text the server sent (see redact.py)

    async def collect(
        self,
        part: Part,
        batch: dict[str, Any],
        files: list[Path],
        last_round: bool,
        reason: str | None = None,
    ) -> Collected:
        """Read the downloaded output/error `files` of `part`'s finished `batch`."""
        result = Collected(round=part.round)
        seen: set[str] = set()
        gate = asyncio.Semaphore(IN_FLIGHT_LINES)
        pending: set[asyncio.Task] = set()
        for path in files:
            with path.open("rb") as f:
                for raw in f:
                    await gate.acquire()
                    task = asyncio.create_task(
                        self._guarded(gate, raw, part, batch, last_round, seen, result)
                    )
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    # A storage error stops the collection at once, as it stops a live run.
                    for t in [t for t in pending if t.done() and t.exception()]:
                        raise t.exception()  # type: ignore[misc]
        if pending:
            results = await asyncio.gather(*pending, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        code, message = NOT_RUN_REASONS.get(
            str(batch.get("status")), ("batch_incomplete", "the batch returned no result for it")
        )
        if reason:
            message = f"{message}: {reason}"
        for cid, images in part.units.items():
            if cid not in seen:
                self._not_run(result, batch, images, code, message)
        return result

    async def _guarded(
        self,
        gate: asyncio.Semaphore,
        raw: bytes,
        part: Part,
        batch: dict[str, Any],
        last_round: bool,
        seen: set[str],
        result: Collected,
    ) -> None:
        try:
            await self._line(raw, part, batch, last_round, seen, result)
        finally:
            gate.release()

    async def _line(
        self,
        raw: bytes,
        part: Part,
        batch: dict[str, Any],
        last_round: bool,
        seen: set[str],
        result: Collected,
    ) -> None:
        try:
            line = json.loads(raw)
        except ValueError:
            return  # a torn or foreign line: its images stay unanswered (not_run), never guessed
        cid = line.get("custom_id") if isinstance(line, dict) else None
        if not isinstance(cid, str) or cid in seen:
            return
        images = part.units.get(cid)
        if images is None:
            return
        seen.add(cid)
        # Already journaled from this very batch (a run stopped before the ledger said it was
        # collected): never stored twice. An image made earlier by another call (`--force`)
        # is stored again: this batch made and billed it anew.
        todo = [img for img in images if not self._succeeded(img[0], batch.get("id"))]
        if not todo:
            return
        response = line.get("response") if isinstance(line.get("response"), dict) else None
        error = line.get("error") if isinstance(line.get("error"), dict) else None
        if response is None:
            code = scrub(str((error or {}).get("code") or "batch_incomplete"), self.secrets)
            message = redact(
                str((error or {}).get("message") or "the batch did not run this request"),
                self.secrets,
            )
            self._not_run(result, batch, todo, code, message)
            return
        status = response.get("status_code")
        request_id = (
            scrub(response["request_id"], self.secrets)
            if isinstance(response.get("request_id"), str)
            else None
        )
        body = response.get("body")
        if isinstance(status, int) and 200 <= status < 300 and isinstance(body, dict):
            await self._images(cid, images, todo, body, request_id, batch, last_round, result)
            return
        failure = error_from_response(
            status if isinstance(status, int) else 500,
            {"x-request-id": request_id} if request_id else {},
            json.dumps(body).encode("utf-8"),
            self.secrets,
        )
        await self._failed(cid, todo, failure, batch, last_round, result)

    def _succeeded(self, key: str, batch_id: Any = _ANY) -> bool:
        """Whether the journal has `key` succeeded (by batch `batch_id`, when one is named)."""
        rec = self.done.get(key)
        if rec is None or rec.status != "succeeded":
            return False
        return batch_id is _ANY or rec.batch_id == batch_id

    async def _images(
        self,
        cid: str,
        line: list[list[Any]],  # every image the line asked for (it is priced whole)
        images: list[list[Any]],  # those not yet collected from this batch
        body: dict[str, Any],
        request_id: str | None,
        batch: dict[str, Any],
        last_round: bool,
        result: Collected,
    ) -> None:
        raw_data, raw_usage = body.get("data"), body.get("usage")
        data: list[Any] = raw_data if isinstance(raw_data, list) else []
        usage = raw_usage if isinstance(raw_usage, dict) else None
        per_in, per_out = _tokens_per_image(usage, len(images))
        costs = self.pricer(cid, line, len(data), usage) if self.pricer is not None else {}
        missing: list[list[Any]] = []
        # Images of one line map to its image keys in order, as a live call's `data` does.
        for image, item in zip(images, data + [None] * (len(images) - len(data))):
            key, job_id, stem, index = image
            blob, revised = await self._bytes(item, request_id)
            if blob is None:
                missing.append(image)
                continue
            expected = self.expect(key) if self.expect is not None else None
            try:
                stored = await run_off_loop(
                    self.store.stage, blob, f"{stem}_{index}", key, expected
                )
            except UnexpectedImage as wrong:
                # Whole, but not what was asked for: failed at once, with its share of the
                # line's cost (a retry would bill the same answer again), as in a live run.
                await self._unexpected(image, wrong, request_id, batch, result, costs)
                continue
            except CorruptImage:
                missing.append(image)
                continue
            record = ImageRecord(
                key=key,
                job_id=job_id,
                index=index,
                status="succeeded",
                file=stored.file,
                sha256=stored.sha256,
                width=stored.width,
                height=stored.height,
                revised_prompt=revised,
                attempts=result.round,
                request_id=request_id,
                input_tokens=per_in,
                output_tokens=per_out,
                run_id=self.run_id,
                batch_id=batch.get("id"),
                **costs,
                moved_from=stored.staged,
            )
            # As in a live run: journaled while the bytes are still staged, then moved. A
            # crash in between leaves a line the next run finishes (Files.recover), so the
            # re-collected line finds the image done: never stored twice, never paid again.
            await self._record(record, result, commit=stored)
        if missing:
            failure = TransientError(
                f"{len(missing)} of {len(images)} images missing or not decodable in the batch output",
                status=200,
                code="malformed_response",
                request_id=request_id,
            )
            await self._failed(cid, missing, failure, batch, last_round, result)

    async def _unexpected(
        self,
        image: list[Any],
        wrong: UnexpectedImage,
        request_id: str | None,
        batch: dict[str, Any],
        result: Collected,
        costs: dict[str, Any],
    ) -> None:
        key, job_id, _stem, index = image
        record = ImageRecord(
            key=key,
            job_id=job_id,
            index=index,
            status="failed",
            attempts=result.round,
            request_id=request_id,
            error_code=wrong.code,
            error_message=str(wrong)[:500],
            run_id=self.run_id,
            batch_id=batch.get("id"),
            **costs,
        )
        await self._record(record, result)

    async def _bytes(
        self, item: Any, request_id: str | None
    ) -> tuple[bytes | bytearray | None, str | None]:
        if not isinstance(item, dict):
            return None, None
        revised = (
            scrub(item["revised_prompt"], self.secrets)
            if isinstance(item.get("revised_prompt"), str)
            else None
        )
        if isinstance(item.get("b64_json"), str):
            try:
                return pybase64.b64decode(item["b64_json"], validate=True), revised
            except (binascii.Error, ValueError):
                return None, revised
        if isinstance(item.get("url"), str):
            try:
                return await self.download(item["url"]), revised
            except ApiError:
                return None, revised
        return None, revised

    async def _failed(
        self,
        cid: str,
        images: list[list[Any]],
        error: ApiError,
        batch: dict[str, Any],
        last_round: bool,
        result: Collected,
    ) -> None:
        if isinstance(error, TransientError) and not last_round:
            result.retry.setdefault(cid, []).extend(images)
            return
        status = "rejected" if isinstance(error, RejectedError) else "failed"
        for key, job_id, _stem, index in images:
            record = ImageRecord(
                key=key,
                job_id=job_id,
                index=index,
                status=status,
                attempts=result.round,
                request_id=error.request_id,
                error_code=error.error_code,
                error_message=error.message[:500],
                run_id=self.run_id,
                batch_id=batch.get("id"),
            )
            await self._record(record, result)

    async def _record(
        self, record: ImageRecord, result: Collected, commit: StoredImage | None = None
    ) -> None:
        """Journal the outcome; a staged image is renamed into images/ only after its line."""
        await self.journal.record(record)
        if commit is not None:
            await run_off_loop(self.store.commit, commit)
        self.done[record.key] = record
        result.records.append(record)
        if self.on_record is not None:
            self.on_record(record)

    def _not_run(
        self,
        result: Collected,
        batch: dict[str, Any],
        images: list[list[Any]],
        code: str,
        message: str,
    ) -> None:
        for key, job_id, _stem, index in images:
            if not self._succeeded(key):
                record = not_run(key, job_id, index, code, message, self.run_id, batch.get("id"))
                result.not_run.append(record)


def not_run(
    key: str, job_id: str, index: int, code: str, message: str, run_id: str, batch_id: Any
) -> ImageRecord:
    """An image a batch did not make, with the reason: kept in memory only (the manifest
    shows it; the journal does not, so the next run takes the image up again)."""
    return ImageRecord(
        key=key,
        job_id=job_id,
        index=index,
        status="not_run",
        error_code=code,
        error_message=message,
        run_id=run_id,
        batch_id=batch_id,
    )


def _tokens_per_image(usage: dict[str, Any] | None, n: int) -> tuple[float | None, float | None]:
    try:
        return usage["input_tokens"] / n, usage["output_tokens"] / n  # type: ignore[index]
    except (KeyError, TypeError, ZeroDivisionError):
        return None, None
