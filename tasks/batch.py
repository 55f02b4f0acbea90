"""Batch transport: the run's pending images through OpenAI's Batch API instead of live calls.

Reading, validation, planning, the images folder, the journal and the manifest are the live
run's; only the transport differs. `submit` resumes what the ledger left open, turns the
new request units into JSONL input files (one batch each; what a batch cannot carry is
returned to go live, or refused), uploads them and creates their batches, recording each
step in the ledger before taking the next. `wait` polls until every batch is finished,
collects each one's files into the journal and sends transiently failed lines again (a new
batch, or live), up to `max_rounds` batches per image.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagebatch.configs.prices import PriceBook
from imagebatch.configs.settings import ApiSettings, BatchSettings
from imagebatch.tasks.batch_api import BatchApi, batch_error_summary, is_terminal
from imagebatch.tasks.batch_collect import Collector, Download, not_run
from imagebatch.tasks.batch_ledger import BATCH_DIR, Ledger, Part
from imagebatch.tasks.batch_lines import custom_id, publish, refusal, write_input_files
from imagebatch.tasks.budget import Budget, CapReached, Reservation
from imagebatch.tasks.cost import Estimate, cost_fields, estimate_unit, price_call
from imagebatch.tasks.errors import ApiError, ConfigError, FatalError, OutputError
from imagebatch.tasks.files import file_sha256
from imagebatch.tasks.journal import ImageRecord, Journal
from imagebatch.tasks.plan import PlannedJob, RequestUnit, units_for
from imagebatch.tasks.store import Expected, ImageStore

log = logging.getLogger("imagebatch")

Work = list[tuple[PlannedJob, list[int]]]


@dataclass
class BatchRun:
    api: BatchApi
    settings: BatchSettings
    store: ImageStore
    journal: Journal
    records: dict[str, ImageRecord]  # the run's records; not_run reasons are added in memory
    planned: list[PlannedJob]
    run_id: str
    download: Download
    notice: Callable[[str], None]
    on_record: Callable[[ImageRecord], None] | None = None
    # Called with one row per batch whenever a batch's state changes (a Prefect artifact).
    on_progress: Callable[[list[dict[str, Any]]], Awaitable[None]] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # The run's budget and price book: batches are priced with the batch discount, and each
    # line's worst case is booked against the cap before it is submitted.
    budget: Budget | None = None
    prices: PriceBook | None = None
    fatal: BaseException | None = None
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = self.store.out_dir
        self.folder = self.out_dir / BATCH_DIR
        self.ledger = Ledger.load(self.out_dir)
        self.by_key = {key: (p, i) for p in self.planned for i, key in enumerate(p.keys)}
        self._rounds = 0
        self._shown: dict[str, tuple[Any, ...]] = {}
        # custom_id -> its booked worst case and the estimate it was booked at
        self._reserved: dict[str, tuple[Reservation, Estimate]] = {}
        self._capped: str | None = None
        self.collector = Collector(
            self.store,
            self.journal,
            self.run_id,
            self.download,
            self.records,
            self._recorded,
            self._price,
            self._expected,
            self.api.secrets,
        )

    def _count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def _recorded(self, record: ImageRecord) -> None:
        self._count(f"batch_{record.status}")
        if self.on_record is not None:
            self.on_record(record)

    def _halt(self, reason: BaseException) -> None:
        if self.fatal is None:
            self.fatal = reason
        self.stop.set()

    # ------------------------------------------------------------------ submit
    async def submit(self, work: Work) -> Work:
        """Resume open parts, submit the new work; returns the work that goes live."""
        if self.folder.is_dir():
            # Half-written input files and downloads of a killed run: ours, never complete.
            for leftover in self.folder.glob(".tmp-*"):
                leftover.unlink(missing_ok=True)
        for part in self.ledger.open_parts():
            if part.file_id is None:
                # Never uploaded (or the upload's answer was lost): nothing was submitted.
                self.ledger.record(
                    {"event": "dropped", "part": part.name, "reason": "not uploaded before a stop"}
                )
                self._remove(part.file)
        held = {key for part in self.ledger.open_parts() for key in part.image_keys()}
        if held:
            self.notice(
                f"{len(held)} image(s) are already in batches of an earlier run: "
                "collecting those, never submitting them again"
            )
        batchable: list[RequestUnit] = []
        live: list[tuple[RequestUnit, str]] = []
        for plan, indices in work:
            free = [i for i in indices if plan.keys[i] not in held]
            for unit in units_for(plan, free):
                why = refusal(unit)
                if why is None:
                    if self._book(unit):
                        batchable.append(unit)
                elif self.settings.not_batchable == "live":
                    live.append((unit, why))
                else:
                    self._refuse(unit, f"not batchable: {why}")
        if live:
            self.notice(
                f"{sum(u.n for u, _ in live)} image(s) cannot go through the Batch API "
                f"({live[0][1]}): sent live"
            )
        self._add_parts(batchable, 1)
        await self._submit_open()
        return _as_work(u for u, _ in live)

    def _refuse(self, unit: RequestUnit, why: str, code: str = "not_batchable") -> None:
        self._count("batch_refused" if code == "not_batchable" else f"batch_{code}", unit.n)
        for i in unit.indices:
            self._mark(unit.planned.keys[i], unit.planned.job_id, i, code, why, None)

    # ------------------------------------------------------------------ cost
    def _book(self, unit: RequestUnit) -> bool:
        """Book the line's worst case (at batch prices) against the cost cap; False (and the
        images not_run, cost_cap) when it does not fit."""
        if self.budget is None or self.prices is None:
            return True
        if self._capped is not None:
            self._refuse(unit, self._capped, "cost_cap")
            return False
        est = estimate_unit(self.prices, unit.planned.job, unit.n, batch=True)
        try:
            reservation = self.budget.reserve(est.worst_usd, unit.label)
            self._reserved[custom_id(unit)] = (reservation, est)
        except CapReached as cap:
            if cap.stops:
                self._capped = cap.reason
            self._refuse(unit, cap.reason, "cost_cap")
            return False
        return True

    def _price(
        self, cid: str, line: list[list[Any]], images: int, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Cost fields of each image of an answered line (`line`: the images it asked for;
        `images`: how many came back): its usage at the model's batch discount. The line's
        booking is settled with that cost; a line booked by an earlier run (collected now)
        has no booking here, and the budget adds its cost to this run's spend."""
        found = self.by_key.get(line[0][0]) if line else None
        if self.prices is None or found is None:
            return {}
        job = found[0].job
        call = price_call(self.prices, job, images, usage, batch=True)
        reservation, est = self._reserved.pop(cid, (None, None))
        if self.budget is not None:
            self.budget.settle(reservation, call.usd)
        if est is None:
            est = estimate_unit(self.prices, job, len(line), batch=True)
        return cost_fields(call, est, len(line))

    def _expected(self, key: str) -> Expected | None:
        """What the image's request asked for: a batch image is checked as a live one is."""
        found = self.by_key.get(key)
        return Expected.of(found[0].job.params) if found is not None else None

    def _release(self, part: Part) -> None:
        """Lines of a collected batch that were not answered with images cost nothing."""
        if self.budget is None:
            return
        for cid in part.units:
            booked = self._reserved.pop(cid, None)
            if booked is not None:
                self.budget.settle(booked[0])

    def _mark(
        self, key: str, job_id: str, index: int, code: str, message: str, batch_id: str | None
    ) -> None:
        """An in-memory not_run outcome with its reason (see batch_collect.not_run)."""
        self._keep_not_run(not_run(key, job_id, index, code, message, self.run_id, batch_id))

    def _keep_not_run(self, record: ImageRecord) -> None:
        held = self.records.get(record.key)
        if held is None or held.status != "succeeded":
            self.records[record.key] = record

    def _add_parts(self, units: list[RequestUnit], round_: int) -> None:
        if not units:
            return
        self._rounds += 1
        try:
            files, refused = write_input_files(
                units,
                self.folder,
                f"{self.run_id}-{self._rounds:02d}",
                self.settings.max_lines,
                self.settings.max_bytes,
            )
        except OSError as exc:
            raise OutputError(
                f"cannot write batch input files in {self.folder}: {exc.strerror or exc}"
            ) from None
        for unit, why in refused:
            self._refuse(unit, why)
        for f in files:
            self.ledger.record(
                {
                    "event": "part",
                    "part": f.name,
                    "endpoint": f.endpoint,
                    "file": f"{BATCH_DIR}/{f.path.name}",
                    "lines": f.lines,
                    "bytes": f.bytes,
                    "sha256": f.sha256,
                    "units": f.units,
                    "round": round_,
                }
            )
            publish(f)

    async def _submit_open(self) -> None:
        for part in self.ledger.open_parts():
            if self.stop.is_set():
                return
            try:
                await self._submit(part)
            except FatalError as error:
                self._halt(error)
                return
            except ApiError as error:
                # A file the API will not take: its images were never sent, so they are free
                # for the next run; the reason shows in the manifest.
                self.ledger.record({"event": "dropped", "part": part.name, "reason": str(error)})
                self._remove(part.file)
                for images in part.units.values():
                    for key, job_id, _stem, index in images:
                        self._mark(key, job_id, index, "batch_not_submitted", str(error), None)

    async def _submit(self, part: Part) -> None:
        if part.file_id is None:
            path = self.out_dir / part.file
            if file_sha256(path) != part.sha256:
                raise ApiError(
                    f"the input file {part.file} is missing or changed", code="input_file_changed"
                )
            file_id = await self.api.upload(path)
            self._count("batch_files_uploaded")
            self.ledger.record({"event": "uploaded", "part": part.name, "file_id": file_id})
        if part.batch_id is None:
            assert part.file_id is not None
            batch, adopted = await self.api.create_or_adopt(
                part.file_id, part.endpoint, part.name, part.uploaded_at
            )
            self._count("batches_adopted" if adopted else "batches_created")
            self.ledger.record(
                {
                    "event": "created",
                    "part": part.name,
                    "batch_id": batch.get("id"),
                    "status": batch.get("status"),
                }
            )
            what = "found again after a stop" if adopted else "submitted"
            self.notice(f"batch {batch.get('id')} {what}: {part.lines} request(s), {part.endpoint}")

    # ------------------------------------------------------------------ wait and collect
    async def wait(self) -> Work:
        """Poll until every submitted batch is finished and collected; returns live retries."""
        started = time.monotonic()
        live: Work = []
        while not self.stop.is_set():
            waiting = [p for p in self.ledger.open_parts() if p.batch_id]
            if not waiting:
                break
            retry: dict[str, list[list[Any]]] = {}
            changed = False
            for part in waiting:
                if self.stop.is_set():
                    break
                try:
                    batch = await self.api.retrieve(part.batch_id)  # type: ignore[arg-type]
                except FatalError as error:
                    self._halt(error)
                    break
                except ApiError as error:
                    self.notice(f"batch {part.batch_id}: status unavailable ({error}); polling on")
                    continue
                changed = self._progress(part, batch, started) or changed
                if not is_terminal(batch):
                    continue
                try:
                    retry.update(await self._collect(part, batch))
                except FatalError as error:
                    self._halt(error)
                    break
                except ApiError as error:
                    # The files stay on the server: the next poll (or run) downloads them again.
                    self.notice(f"batch {part.batch_id}: results not downloaded ({error})")
            if changed and self.on_progress is not None:
                await self.on_progress(self.progress_rows(started))
            if retry:
                live.extend(await self._again(retry))
            if any(p.batch_id and not p.collected for p in self.ledger.open_parts()):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), self.settings.poll_seconds)
        return live

    def progress_rows(self, started: float) -> list[dict[str, Any]]:
        waited = int(time.monotonic() - started)
        rows = []
        for part in self.ledger.parts.values():
            if part.batch_id is None or part.name not in self._shown:
                continue
            status, completed, failed, total = self._shown[part.name]
            rows.append(
                {
                    "batch": part.batch_id,
                    "endpoint": part.endpoint,
                    "status": status,
                    "completed": completed or 0,
                    "failed": failed or 0,
                    "requests": total or part.lines,
                    "waited": f"{waited // 60}m{waited % 60:02d}s",
                }
            )
        return rows

    def _progress(self, part: Part, batch: dict[str, Any], started: float) -> bool:
        raw = batch.get("request_counts")
        counts: dict[str, Any] = raw if isinstance(raw, dict) else {}
        state = (
            batch.get("status"),
            counts.get("completed"),
            counts.get("failed"),
            counts.get("total"),
        )
        if self._shown.get(part.name) == state:
            return False
        self._shown[part.name] = state
        elapsed = int(time.monotonic() - started)
        self.notice(
            f"batch {part.batch_id}: {state[0]}, {counts.get('completed', 0)}/{counts.get('total', part.lines)} "
            f"completed, {counts.get('failed', 0)} failed ({elapsed // 60}m{elapsed % 60:02d}s waiting)"
        )
        return True

    async def _collect(self, part: Part, batch: dict[str, Any]) -> dict[str, list[list[Any]]]:
        files: list[Path] = []
        for kind in ("output", "error"):
            file_id = batch.get(f"{kind}_file_id")
            if isinstance(file_id, str):
                dest = self.folder / f"{part.name}.{kind}.jsonl"
                await self.api.download(file_id, dest)
                files.append(dest)
        reason = batch_error_summary(batch) if batch.get("status") == "failed" else None
        last = part.round >= self.settings.max_rounds
        got = await self.collector.collect(part, batch, files, last, reason)
        for rec in got.not_run:
            self._keep_not_run(rec)
        self._release(part)
        self.ledger.record(
            {
                "event": "collected",
                "part": part.name,
                "batch_id": part.batch_id,
                "status": batch.get("status"),
            }
        )
        self._count("batches_collected")
        for path in files:
            path.unlink(missing_ok=True)
        self._remove(part.file)
        if reason:
            self.notice(f"batch {part.batch_id} failed: {reason}")
        return got.retry

    async def _again(self, retry: dict[str, list[list[Any]]]) -> Work:
        """Send transiently failed lines again: a new batch round or live."""
        units: list[RequestUnit] = []
        rounds = max(
            (p.round for p in self.ledger.parts.values() if set(retry) & set(p.units)), default=1
        )
        by_plan: dict[int, tuple[PlannedJob, list[int]]] = {}
        for images in retry.values():
            for key, job_id, _stem, index in images:
                found = self.by_key.get(key)
                if found is None:
                    self._mark(
                        key,
                        job_id,
                        index,
                        "batch_retry_lost",
                        "the jobs changed; rerun to redo it",
                        None,
                    )
                    continue
                plan, i = found
                by_plan.setdefault(id(plan), (plan, []))[1].append(i)
        for plan, indices in by_plan.values():
            units.extend(units_for(plan, indices))
        if self.settings.retry_lines != "live":
            units = [u for u in units if self._book(u)]
        self._count("batch_lines_retried", len(units))
        if self.settings.retry_lines == "live":
            return _as_work(units)
        self._add_parts(units, rounds + 1)
        await self._submit_open()
        return []

    # ------------------------------------------------------------------ leaving
    def mark_pending(self) -> int:
        """Images still in open batches become not_run saying how to collect them."""
        pending = 0
        for part in self.ledger.open_parts():
            if part.batch_id:
                why = (
                    f"waiting in batch {part.batch_id} ({part.status or 'submitted'}); "
                    "rerun the same command to collect it"
                )
                code = "batch_pending"
            else:
                why, code = "not yet submitted; rerun the same command", "batch_not_submitted"
            for images in part.units.values():
                for key, job_id, _stem, index in images:
                    rec = self.records.get(key)
                    if rec is None or rec.status != "succeeded":
                        pending += 1
                        self._mark(key, job_id, index, code, why, part.batch_id)
        self.stats["batch_pending"] = pending
        return pending

    def _remove(self, rel: str) -> None:
        """Delete a file of ours under batch/ (the ledger names it)."""
        path = self.out_dir / rel
        if path.parent == self.folder:
            path.unlink(missing_ok=True)


def check_batch_target(api: ApiSettings) -> None:
    """Refuse --batch where this transport would send to the wrong paths (usage error)."""
    if api.is_azure:
        raise ConfigError(
            "--batch is not supported against Azure OpenAI: its Batch API uses global-batch "
            "deployments and other paths; run live, or target api.openai.com"
        )


def _as_work(units: Any) -> Work:
    grouped: dict[int, tuple[PlannedJob, list[int]]] = {}
    for unit in units:
        grouped.setdefault(id(unit.planned), (unit.planned, []))[1].extend(unit.indices)
    return list(grouped.values())


async def batch_status(out_dir: Path, api: BatchApi) -> list[dict[str, Any]]:
    """Every batch the folder's ledger knows, with the server's current status and counts."""
    rows = []
    for part in Ledger.load(out_dir).parts.values():
        row: dict[str, Any] = {
            "part": part.name,
            "batch_id": part.batch_id,
            "endpoint": part.endpoint,
            "requests": part.lines,
            "status": "collected" if part.collected else part.status,
            "collected": part.collected,
            "dropped": part.dropped,
        }
        if part.dropped:
            row["status"] = "dropped"
        elif part.batch_id is None:
            row["status"] = "not submitted"
        elif not part.collected:
            try:
                batch = await api.retrieve(part.batch_id)
            except ApiError as error:
                row["status"] = f"unknown ({error})"
            else:
                raw = batch.get("request_counts")
                counts: dict[str, Any] = raw if isinstance(raw, dict) else {}
                row.update(
                    status=batch.get("status"),
                    completed=counts.get("completed"),
                    failed=counts.get("failed"),
                )
        rows.append(row)
    return rows


async def batch_cancel(out_dir: Path, api: BatchApi) -> list[tuple[str, str]]:
    """Ask the server to cancel every submitted, unfinished batch of the folder.

    Returns (batch id, status or error) per batch. What a cancelled batch finished is still
    collected by the next run; the rest becomes not_run ("batch_cancelled")."""
    out = []
    for part in Ledger.load(out_dir).open_parts():
        if part.batch_id is None:
            continue
        try:
            batch = await api.cancel(part.batch_id)
        except ApiError as error:
            out.append((part.batch_id, str(error)))
        else:
            out.append((part.batch_id, str(batch.get("status"))))
    return out
