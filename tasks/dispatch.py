"""Dispatch: the one place a request unit becomes images on disk and journal lines.

Every call goes limiter -> budget -> client -> store -> journal here, under the retry
policy, so the cost cap has exactly one seat. Outcomes are recorded per image. A fatal
error or Ctrl-C sets `stop`: units not yet started become `not_run`, and units in flight
finish. The cost cap stops dispatching the same way without being fatal: its `not_run`
images carry the reason `cost_cap`. A model the server does not serve (404
model_not_found) fails that model's units not yet sent, without sending them; the other
models' units go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.states import Failed

from imagebatch.configs.prices import PriceBook
from imagebatch.configs.settings import RetrySettings
from imagebatch.tasks.admission import Admission
from imagebatch.tasks.api_client import ApiResult, ImagesClient
from imagebatch.tasks.budget import Budget, CapReached, Reservation
from imagebatch.tasks.cost import Estimate, cost_fields, estimate_unit, price_call
from imagebatch.tasks.errors import (
    AmbiguousError,
    ApiError,
    FatalError,
    ModelUnavailable,
    OutputError,
    RateLimited,
    RejectedError,
)
from imagebatch.tasks.journal import ImageRecord, Journal
from imagebatch.tasks.limiter import BodyEstimate, Limiter, Permit
from imagebatch.tasks.plan import RequestUnit
from imagebatch.tasks.prepare import PreparedInputs, SourceError, prepare_job, save_prepared
from imagebatch.tasks.retry import malformed_response_error
from imagebatch.tasks.retry_policy import retrying
from imagebatch.tasks.store import (
    CorruptImage,
    Expected,
    ImageStore,
    UnexpectedImage,
    run_off_loop,
)

log = logging.getLogger("imagebatch")


class Stopped(Exception):
    """The run was told to stop before this unit was sent."""


@dataclass
class _Progress:
    """One request unit across its attempts: what is done, what is still missing."""

    unit: RequestUnit
    remaining: list[int]
    done: list[ImageRecord] = field(default_factory=list)
    attempts: int = 0
    ambiguous: int = 0
    last_request_id: str | None = None
    inputs: PreparedInputs | None = None  # edits and variations: the bytes sent
    lost: Decimal = Decimal(0)  # worst case of its requests that may have been billed unanswered
    cost: dict[str, Any] = field(default_factory=dict)  # journal cost fields of the last answer


@dataclass
class Dispatcher:
    client: ImagesClient
    limiter: Limiter
    retry: RetrySettings
    store: ImageStore
    journal: Journal
    run_id: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    fatal: BaseException | None = None
    stats: Counter = field(default_factory=Counter)
    on_image: Any = None  # callback(record) for progress display
    # (model, deployment) -> the server's answer that it does not serve it
    unavailable: dict[tuple[str, str], ModelUnavailable] = field(default_factory=dict)
    keep_prepared: bool = False  # [inputs] keep_prepared: write the bytes sent to prepared/
    budget: Budget = field(default_factory=Budget)
    prices: PriceBook = field(default_factory=PriceBook.load)
    # Why units not sent become not_run (error_code, message), when the reason is ours to give.
    not_run_reason: tuple[str, str] | None = None
    # Jobs started and not finished, gated by the limiter's cap (the flow's fan-out and
    # chunk tasks start jobs through it).
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(lambda: self.limiter.in_flight_cap, self.stop)

    def halt(self, reason: BaseException) -> None:
        """Stop dispatching new units; the first reason is the one reported."""
        if self.fatal is None:
            self.fatal = reason
        self.stop.set()
        self.admission.wake()

    def stop_at_cap(self, reason: str) -> None:
        """The cost cap was reached: stop dispatching; requests in flight finish. Not fatal:
        the run ends normally (exit 1) with the rest not_run."""
        if not self.stop.is_set():
            self.not_run_reason = ("cost_cap", reason)
        self.stop.set()
        self.admission.wake()

    async def _record(self, record: ImageRecord) -> ImageRecord:
        await self.journal.record(record)
        return self._count(record)

    def _count(self, record: ImageRecord) -> ImageRecord:
        self.stats[record.status] += 1
        if self.on_image is not None:
            self.on_image(record)
        return record

    async def run_unit(self, unit: RequestUnit) -> list[ImageRecord]:
        """Send one unit with retries; store what comes back; return one record per image."""
        progress = _Progress(unit, list(unit.indices))
        if self.stop.is_set():
            return [self.not_run(unit, i) for i in progress.remaining]
        try:
            progress.inputs = await self._prepare(unit)
        except OutputError as error:  # keep_prepared could not write: the disk, not the row
            self.halt(error)
            return [self.not_run(unit, i) for i in progress.remaining]
        except (SourceError, OSError, ValueError) as error:
            await self._record_input_error(progress, error)
            return progress.done
        try:
            async for attempt in retrying(
                self.retry, on_retry=lambda e, a, w: self._on_retry(e, a, w, progress)
            ):
                with attempt:
                    await self._attempt(progress)
        except Stopped:
            return progress.done + [self.not_run(unit, i) for i in progress.remaining]
        except CapReached as cap:
            if cap.stops:
                self.stop_at_cap(cap.reason)
            reason = ("cost_cap", cap.reason)
            return progress.done + [self.not_run(unit, i, reason) for i in progress.remaining]
        except OutputError as error:
            self.halt(error)
            return progress.done + [self.not_run(unit, i) for i in progress.remaining]
        except ApiError as error:
            if isinstance(error, FatalError):
                self.halt(error)
            await self._record_failure(progress, error)
        except Exception as exc:  # a bug: its images fail with its name, and the run stops
            bug = ApiError(f"{type(exc).__name__}: {exc}"[:500], code="internal_error")
            self.halt(RuntimeError(f"stopped by an unexpected error (a bug): {bug.message}"))
            log.exception("unexpected error in a request unit")
            await self._record_failure(progress, bug)
        return progress.done

    async def _prepare(self, unit: RequestUnit) -> PreparedInputs | None:
        """Edits and variations: the sources as the model takes them, prepared once per unit
        (off the event loop) and reused by its retries."""
        if unit.planned.job.operation == "generate":
            return None
        inputs = await asyncio.to_thread(prepare_job, unit.planned.job)
        if inputs is not None and self.keep_prepared:
            await asyncio.to_thread(
                save_prepared, self.store.out_dir, unit.planned.file_stem, inputs
            )
        return inputs

    async def _record_input_error(self, progress: _Progress, error: Exception) -> None:
        """A source that cannot be prepared now (changed or gone since validation): its
        images fail without a request."""
        for index in progress.remaining:
            record = self._image_record(
                progress.unit,
                index,
                status="failed",
                error_code="input_error",
                error_message=str(error)[:500],
            )
            progress.done.append(await self._record(record))

    def _on_retry(self, error: ApiError, attempt: int, wait: float, progress: _Progress) -> None:
        """A retry is about to be sent. After a lost answer or an unusable 2xx the server may
        have billed the last attempt, so the images still missing may be paid twice."""
        self.stats["retries"] += 1
        if _maybe_billed(error):
            progress.ambiguous += 1
            self.stats["ambiguous"] += 1
        _task_logger().info("attempt %d failed (%s); retrying in %.1fs", attempt, error, wait)

    async def _attempt(self, progress: _Progress) -> None:
        """One request for the images still missing; a short answer is retried as malformed."""
        if self.stop.is_set():
            raise Stopped()
        self._raise_if_unavailable(progress.unit)
        sub = RequestUnit(progress.unit.planned, tuple(progress.remaining))
        # The slot (and its share of the memory budget) is held until the answer's images are
        # journaled: a request counts as in flight until what it bought is durable, so a crash
        # can cost at most the requests in flight (--max-in-flight), never answers queued for
        # the disk.
        async with self.limiter.slot(sub.n, _expected_body(self.limiter, sub)) as permit:
            result = await self._send(sub, progress, permit)
            progress.last_request_id = result.request_id
            await self._store(sub, result, progress)
        if progress.remaining:
            got = len(result.images)
            raise malformed_response_error(
                f"{len(progress.remaining)} of {sub.n} images missing or not decodable (got {got})",
                200,
                result.request_id,
            )

    async def _send(self, sub: RequestUnit, progress: _Progress, permit: Permit) -> ApiResult:
        """The request under the caller's limiter slot and the budget; the limiter learns from
        every answer, the budget books the request's worst case before it goes and its cost after."""
        if self.stop.is_set():
            raise Stopped()
        self._raise_if_unavailable(sub)  # learnt while this unit waited for its slot
        est = estimate_unit(self.prices, sub.planned.job, sub.n)
        reservation = self.budget.reserve(est.worst_usd, sub.label)
        progress.attempts += 1
        try:
            result = await self.client.send(sub, progress.inputs)
        except ApiError as error:
            self._settle_error(reservation, est, error, progress)
            permit.record(error.headers, None)
            if isinstance(error, RateLimited):
                self.stats["rate_limited"] += 1
                self.limiter.rate_limited(error.retry_after, error.headers, error.message)
            if isinstance(error, ModelUnavailable):
                self._mark_unavailable(sub, error)
            raise
        except BaseException:  # abandoned in flight (a second Ctrl-C): may have been billed
            self.budget.settle(reservation, lost=True)
            raise
        permit.record(result.headers, result.latency, [len(i.data) for i in result.images])
        call = price_call(self.prices, sub.planned.job, len(result.images), result.usage)
        self.budget.settle(reservation, call.usd)
        progress.cost = cost_fields(call, est, sub.n)
        return result

    def _raise_if_unavailable(self, unit: RequestUnit) -> None:
        """The server already said it does not serve this model: fail without a request."""
        known = self.unavailable.get(_model_key(unit))
        if known is not None:
            raise ModelUnavailable(
                known.message,
                status=known.status,
                code=known.code,
                type=known.type,
                request_id=known.request_id,
            )

    def _mark_unavailable(self, sub: RequestUnit, error: ModelUnavailable) -> None:
        key = _model_key(sub)
        if key not in self.unavailable:
            self.unavailable[key] = error
            self.stats["models_unavailable"] += 1
            log.warning(
                "the server does not serve %s (%s): its remaining images fail, other models go on",
                key[0],
                error,
            )

    def _settle_error(
        self, reservation: Reservation, est: Estimate, error: ApiError, progress: _Progress
    ) -> None:
        """An error answer costs nothing; a request lost after sending, or a 2xx with an
        unusable body, may have been billed: its worst case stays booked as possibly paid."""
        billed = _maybe_billed(error)
        self.budget.settle(reservation, lost=billed)
        if billed:
            progress.lost += est.worst_usd or 0

    async def _store(self, sub: RequestUnit, result: ApiResult, progress: _Progress) -> None:
        """Save and journal each whole image. One that is not whole stays remaining (retried
        as malformed); a whole one that is not what was asked for (format, size) fails at
        once: asking again would pay for the same answer."""
        input_tokens, output_tokens = _tokens_per_image(result.usage, sub.n)
        expected = Expected.of(sub.planned.job.params)
        for index, image in zip(list(progress.remaining), result.images):
            key = sub.planned.keys[index]
            stem = sub.planned.image_stem(index)
            try:
                stored = await run_off_loop(self.store.stage, image.data, stem, key, expected)
            except UnexpectedImage as wrong:
                await self._record_unexpected(progress, index, wrong, result.request_id)
                continue
            except CorruptImage:
                continue
            finally:
                image.data = b""  # on disk now, or of no use: never held past this point
            record = self._image_record(
                progress.unit,
                index,
                status="succeeded",
                file=stored.file,
                sha256=stored.sha256,
                width=stored.width,
                height=stored.height,
                revised_prompt=image.revised_prompt,
                attempts=progress.attempts,
                request_id=result.request_id,
                ambiguous_retries=progress.ambiguous,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                **_input_fields(progress.inputs),
                possibly_paid_usd=float(progress.lost / progress.unit.n),
                **progress.cost,
                moved_from=stored.staged,
            )
            # Journaled while the bytes are still staged, then moved: a crash in between
            # leaves a line the next run finishes (tasks/files.py), never an unrecorded image.
            await self.journal.record(record)
            await run_off_loop(self.store.commit, stored)
            progress.done.append(self._count(record))
            progress.remaining.remove(index)

    async def _record_unexpected(
        self, progress: _Progress, index: int, wrong: UnexpectedImage, request_id: str | None
    ) -> None:
        """A whole image in a format or size not asked for: failed, not stored, not retried.
        It was answered, so it was billed: the record carries its share of the call's cost."""
        record = self._image_record(
            progress.unit,
            index,
            status="failed",
            attempts=progress.attempts,
            request_id=request_id,
            error_code=wrong.code,
            error_message=str(wrong)[:500],
            ambiguous_retries=progress.ambiguous,
            **_input_fields(progress.inputs),
            possibly_paid_usd=float(progress.lost / progress.unit.n),
            **progress.cost,
        )
        progress.done.append(await self._record(record))
        progress.remaining.remove(index)

    async def _record_failure(self, progress: _Progress, error: ApiError) -> None:
        """Every image still missing gets the final error: `rejected` or `failed`."""
        status = "rejected" if isinstance(error, RejectedError) else "failed"
        for index in progress.remaining:
            record = self._image_record(
                progress.unit,
                index,
                status=status,
                attempts=progress.attempts,
                request_id=error.request_id or progress.last_request_id,
                error_code=error.error_code,
                error_message=error.message[:500],
                ambiguous_retries=progress.ambiguous,
                **_input_fields(progress.inputs),
                possibly_paid_usd=float(progress.lost / progress.unit.n),
            )
            progress.done.append(await self._record(record))

    def _image_record(self, unit: RequestUnit, index: int, **fields: Any) -> ImageRecord:
        planned = unit.planned
        return ImageRecord(
            key=planned.keys[index],
            job_id=planned.job_id,
            index=index,
            run_id=self.run_id,
            **fields,
        )

    def not_run(
        self, unit: RequestUnit, index: int, reason: tuple[str, str] | None = None
    ) -> ImageRecord:
        """Never sent, so not journaled (a re-run sends it); the manifest shows the reason."""
        code, message = reason or self.not_run_reason or (None, None)
        return self._count(
            self._image_record(
                unit, index, status="not_run", error_code=code, error_message=message
            )
        )


def _model_key(unit: RequestUnit) -> tuple[str, str]:
    job = unit.planned.job
    return job.model.name, job.deployment or job.model.name


def _expected_body(limiter: Limiter, sub: RequestUnit) -> BodyEstimate:
    """What the answer to `sub` should weigh in memory (the model's default size if none)."""
    job = sub.planned.job
    params = job.params
    return limiter.expected_body(
        job.model.name,
        str(params.get("size") or job.model.default_size),
        sub.n,
        str(params.get("output_format") or ""),
        params.get("output_compression"),
    )


def _input_fields(inputs: PreparedInputs | None) -> dict[str, Any]:
    """What an image's record says about the bytes sent for it."""
    if inputs is None:
        return {}
    return {
        "input_sha256": "|".join(f.sha256 for f in inputs.images),
        "input_mask_sha256": inputs.mask.sha256 if inputs.mask is not None else None,
        "input_preparation": inputs.description,
    }


def _maybe_billed(error: ApiError) -> bool:
    """Sent and possibly billed: the answer was lost, or a 2xx came back unusable."""
    return isinstance(error, AmbiguousError) or (
        error.status is not None and 200 <= error.status < 300
    )


def _task_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect task run's logger (retries show on the job's run page), or ours outside a run."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:
        return log


def _tokens_per_image(usage: dict[str, Any] | None, n: int) -> tuple[float | None, float | None]:
    """Usage is reported per call; each image gets its share so sums over the manifest stay right."""
    try:
        return usage["input_tokens"] / n, usage["output_tokens"] / n  # type: ignore[index]
    except (KeyError, TypeError, ZeroDivisionError):
        return None, None


# The flow sets this before fanning out; tasks awaited in the flow's event loop see it.
current_dispatcher: contextvars.ContextVar[Dispatcher] = contextvars.ContextVar(
    "imagebatch_dispatcher"
)


# No results kept, no cache keys: Prefect never pickles or stores anything of ours; retries
# are per request inside the dispatcher, where the server's hints are known.
_TASK_OPTIONS: dict[str, Any] = {
    "persist_result": False,
    "cache_policy": NONE,
    "retries": 0,
    "log_prints": False,
}


@task(name="generate-images", task_run_name="{job_id}", **_TASK_OPTIONS)
async def process_job(job_id: str, units: list[RequestUnit]) -> Any:
    """One Prefect task per job: its units go out in parallel (dall-e-3 n=4 is four calls).

    Returns small per-image outcome dicts, never image bytes, so memory does not grow with
    the number of images. A job with any image not succeeded ends in a Failed state whose
    message says why, so the Prefect UI shows each job's outcome. The caller admitted the
    job (`Dispatcher.admission`) before starting the task.
    """
    return await _run_units(units, "images", admit=False)


@task(name="generate-images-chunk", task_run_name="{name}", **_TASK_OPTIONS)
async def process_chunk(name: str, units: list[RequestUnit]) -> Any:
    """One Prefect task for many jobs (`[flow] task_per`): the same work as process_job,
    with Prefect's per-task cost paid once per chunk. Its jobs start one by one as
    `Dispatcher.admission` has room and each reports its end there, so the next chunk can
    start while this one's last jobs are still in flight; after a stop, the jobs not yet
    started end not_run without a request."""
    return await _run_units(units, "images in this chunk", admit=True)


async def _run_units(units: list[RequestUnit], what: str, admit: bool) -> Any:
    dispatcher = current_dispatcher.get()
    # Structured: if one unit fails unexpectedly its siblings are cancelled, never orphaned.
    async with asyncio.TaskGroup() as group:
        tasks = []
        for _, job in itertools.groupby(units, key=lambda u: id(u.planned)):
            admitted = admit and await dispatcher.admission.enter()
            tasks.append(group.create_task(_run_job(dispatcher, list(job), admitted)))
    records = [r for t in tasks for r in t.result()]
    outcomes = [
        {"job_id": r.job_id, "index": r.index, "status": r.status, "attempts": r.attempts}
        for r in records
    ]
    bad = [r for r in records if r.status != "succeeded"]
    if not bad:
        return outcomes
    first = bad[0]
    reason = f"{first.error_code}: {first.error_message}" if first.error_code else first.status
    return Failed(message=f"{len(bad)} of {len(records)} {what} not made ({reason})", data=outcomes)


async def _run_job(
    dispatcher: Dispatcher, units: list[RequestUnit], admitted: bool
) -> list[ImageRecord]:
    """One job's units in parallel; its end frees its place in the admission."""
    try:
        if len(units) == 1:
            return await dispatcher.run_unit(units[0])
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(dispatcher.run_unit(u)) for u in units]
        return [r for t in tasks for r in t.result()]
    finally:
        if admitted:
            dispatcher.admission.leave()


class _QuietExpectedFailures(logging.Filter):
    """A job that ends Failed on purpose (a refusal, a 4xx) is reported by its state and the
    manifest; the engine's extra ERROR lines with an empty traceback are noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Task run failed with state")
            or message.startswith("Finished in state Failed")
        )


@contextlib.contextmanager
def quiet_expected_failures() -> Iterator[None]:
    """While a run dispatches, Prefect's task-run logger drops those lines; afterwards it is as it was."""
    logger = logging.getLogger("prefect.task_runs")
    quiet = _QuietExpectedFailures()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
