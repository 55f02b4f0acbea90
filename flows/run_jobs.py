"""The main flow: read jobs, check them, plan requests, dispatch them, write the manifest.

    read_jobs -> validate -> plan (skip what the journal has) -> dispatch (Prefect task per
    job, limiter + retries) -> store + journal -> manifest + run.json

`run_jobs` is the entry point for the CLI and notebooks; `imagebatch_flow` is the Prefect
flow (deployable: its parameters are plain JSON) that does the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import logging
import platform
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prefect import Flow

from imagebatch.configs.prices import PriceBook
from imagebatch.configs.registry import Registry
from imagebatch.configs.settings import (
    FlowSettings,
    LimitSettings,
    Settings,
    check_target,
    load_settings,
    resolve_limits,
    route_overrides,
)
from imagebatch.flows import prefect_api
from imagebatch.flows.batch_phase import run_batch_phase
from imagebatch.flows.control import current_switch
from imagebatch.flows.runlog import UiReporter, quiet_console
from imagebatch.tasks import memory
from imagebatch.tasks.api_client import ImagesClient
from imagebatch.tasks.artifacts import ProgressArtifact, publish_summary
from imagebatch.tasks.batch import check_batch_target
from imagebatch.tasks.batch_lines import refusal
from imagebatch.tasks.budget import Budget, cost_report
from imagebatch.tasks.cost import CostPlan, cost_plan
from imagebatch.tasks.credentials import load_secret_key
from imagebatch.tasks.dispatch import (
    Dispatcher,
    current_dispatcher,
    process_chunk,
    process_job,
    quiet_expected_failures,
)
from imagebatch.tasks.errors import ConfigError, ImagebatchError, InputError, OutputError
from imagebatch.tasks.journal import ImageRecord, Journal
from imagebatch.tasks.limiter import Limiter
from imagebatch.tasks.manifest import STATUSES, Manifest, build_rows, carried_names, write_manifest
from imagebatch.tasks.outdir import FolderLock, check_shaping, read_run_json, write_run_json
from imagebatch.tasks.owned import Files
from imagebatch.tasks.plan import PlannedJob, RequestUnit, plan_jobs, units_for
from imagebatch.tasks.read_jobs import Job, is_frame, read_jobs
from imagebatch.tasks.redact import mask_url
from imagebatch.tasks.report import publish_after_run
from imagebatch.tasks.rundirs import dated_folder, mark_latest
from imagebatch.tasks.store import ImageStore
from imagebatch.tasks.thumbs import Thumbnailer, ThumbSpec
from imagebatch.tasks.validate import Checked, Problem, Validator

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("imagebatch")


def _expected_errors() -> tuple[str, ...]:
    found, todo = [], [ImagebatchError]
    while todo:
        cls = todo.pop()
        found.append(cls.__name__)
        todo.extend(cls.__subclasses__())
    return tuple(found)


class _QuietExpectedErrors(logging.Filter):
    """An ImagebatchError (a jobs file or output folder problem, a refused run) ends the flow
    run Failed with its one-line message, which the caller prints; Prefect's traceback of it
    is noise. Anything else (a bug) is still logged in full."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0] if record.exc_info else None
        if exc is not None and issubclass(exc, ImagebatchError):
            return False
        message = record.getMessage()
        prefix = "Finished in state Failed('Flow run encountered an exception: "
        return not (
            message.startswith(prefix) and message[len(prefix) :].startswith(_expected_errors())
        )


@contextlib.contextmanager
def _quiet_expected_errors() -> Iterator[None]:
    """While run_jobs runs the flow, an expected error is one clean line, not a traceback."""
    logger = logging.getLogger("prefect.flow_runs")
    quiet = _QuietExpectedErrors()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class Reporter(Protocol):
    """What the run tells a person. The CLI draws a progress bar; notebooks stay quiet."""

    def notice(self, message: str) -> None: ...
    def problems(self, problems: list[Problem]) -> None: ...
    def start(self, total: int, skipped: int) -> None: ...
    def image(self, record: ImageRecord) -> None: ...
    def finish(self) -> None: ...


class LogReporter:
    """The default reporter: notices and problems go to the log, nothing else is drawn."""

    def notice(self, message: str) -> None:
        log.warning(message)

    def problems(self, problems: list[Problem]) -> None:
        for p in problems:
            log.warning("%s: %s", p.severity, p)

    def start(self, total: int, skipped: int) -> None:
        pass

    def image(self, record: ImageRecord) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class RunReport:
    """What a run did. `rows` is the manifest as plain rows; `manifest` the same as a
    DataFrame, made (and pandas imported) only when asked for."""

    out_dir: Path
    counts: dict[str, int]
    rows: Manifest
    problems: list[Problem]
    used_simulator: bool
    stopped: str | None = None  # why the run stopped early: a fatal API error, Ctrl-C, a disk error
    skipped: int = 0  # images already done by an earlier run
    stats: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)  # spend, estimate, cap (run.json "cost")

    @cached_property
    def manifest(self) -> pd.DataFrame:
        return self.rows.to_frame()

    @property
    def exit_code(self) -> int:
        if self.stopped:
            return 2
        # Submitted with --no-wait: images waiting in a batch are not failures.
        ok = all(
            r.get("status") == "succeeded" or r.get("error_code") == "batch_pending"
            for r in self.rows.rows
        )
        return 0 if ok else 1


def _shaping(settings: Settings) -> dict[str, Any]:
    """Settings that change finished images when they change (row cells are in the keys)."""
    j = settings.job
    return {
        "model": j.model,
        "size": j.size,
        "quality": j.quality,
        "output_format": j.output_format,
    }


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("imagebatch", "prefect", "httpx", "pillow", "pandas", "tenacity"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


class _FanOut:
    """Starts job tasks, or chunk tasks (`[flow] task_per`), as the dispatcher's admission
    lets jobs in.

    Awaiting tasks directly in the flow's loop is Prefect's fastest shape here. Jobs start
    only while the open ones fit the limiter's in-flight cap (plus slack), so a job shows as
    Running in Prefect only once its requests can go out, and a stop leaves the rest
    unstarted (not_run, no task run). A chunk admits its jobs one by one; the next chunk
    starts once they all started and there is room, so in-flight never sags at a chunk's end.
    """

    def __init__(self, dispatcher: Dispatcher, settings: FlowSettings) -> None:
        self.dispatcher = dispatcher
        self.settings = settings
        self.running: set[asyncio.Task] = set()
        self.handed = 0  # jobs given to chunk tasks so far
        self.last_chunk: asyncio.Task | None = None

    async def run(self, work: list[tuple[PlannedJob, list[int]]]) -> None:
        chunked = self.settings.uses_chunks(len(work))
        size = self.settings.chunk_jobs if chunked else 1
        try:
            for start in range(0, len(work), size):
                part = work[start : start + size]
                units = [u for plan, indices in part for u in units_for(plan, indices)]
                if chunked:
                    name = f"jobs {start + 1}-{start + len(part)}"
                    await self._start_chunk(process_chunk(name, units, return_state=True), units)
                    self.handed += len(part)
                else:
                    await self._start_job(
                        process_job(part[0][0].job_id, units, return_state=True), units
                    )
            while self.running:
                await asyncio.wait(set(self.running))
        except asyncio.CancelledError:
            # A second Ctrl-C: abandon requests in flight, but leave no task writing behind us.
            for task in list(self.running):
                task.cancel()
            await asyncio.gather(*self.running, return_exceptions=True)
            raise

    async def _start_job(self, call: Any, units: list[RequestUnit]) -> None:
        admission = self.dispatcher.admission
        if not await admission.enter():
            self._not_started(call, units)
            return
        self._launch(call).add_done_callback(lambda _: admission.leave())

    async def _start_chunk(self, call: Any, units: list[RequestUnit]) -> None:
        admission = self.dispatcher.admission
        last = self.last_chunk

        def ready() -> bool:  # the chunk before started all its jobs (or ended), and room
            started = last is None or last.done() or admission.admitted >= self.handed
            return started and admission.has_room()

        if not await admission.wait(ready):
            self._not_started(call, units)
            return
        self.last_chunk = self._launch(call)
        self.last_chunk.add_done_callback(lambda _: admission.wake())

    def _not_started(self, call: Any, units: list[RequestUnit]) -> None:
        call.close()  # never awaited: no task run is created
        for unit in units:
            for index in unit.indices:
                self.dispatcher.not_run(unit, index)

    def _launch(self, call: Any) -> asyncio.Task:
        task = asyncio.create_task(self._guard(call))
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return task

    async def _guard(self, call: Any) -> None:
        try:
            state = await call
            error = await state.aresult(raise_on_failure=False)
        except Exception as exc:  # a bug or a storage failure must not strand the other jobs
            error = exc
        if isinstance(error, Exception):  # raised in the task (our Failed states carry data)
            log.error("task failed: %s", error)
            self.dispatcher.halt(error)


@contextlib.contextmanager
def _interrupts(dispatcher: Dispatcher, reporter: Reporter, main_task: asyncio.Task | None):
    """First Ctrl-C: stop dispatching, let requests in flight finish. Second: abandon them."""
    loop = asyncio.get_running_loop()
    presses = 0

    def on_sigint() -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            reporter.notice(
                "Interrupted: finishing requests in flight (Ctrl-C again to abandon them)"
            )
            dispatcher.halt(KeyboardInterrupt("interrupted"))
        elif main_task is not None:
            main_task.cancel()

    switch = current_switch.get()
    if switch is not None:  # a notebook run in a worker thread: the caller forwards Ctrl-C
        switch.attach(loop, on_sigint)
    installed = False
    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        loop.add_signal_handler(signal.SIGTERM, on_sigint)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):
        pass
    try:
        yield
    finally:
        if switch is not None:
            switch.detach()
        if installed:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)


class _KeyMaskingFlow(Flow):
    """Prefect stores a flow run's parameters before the flow's body can refuse a key among
    them: the copy sent to Prefect's database has it masked; the body then refuses the run."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        stored = super().serialize_parameters(parameters)
        overrides = stored.get("overrides")
        if isinstance(overrides, dict) and isinstance(overrides.get("api"), dict):
            if "api_key" in overrides["api"]:
                api = {**overrides["api"], "api_key": "********"}
                stored["overrides"] = {**overrides, "api": api}
        return stored


def _flow(fn: Any) -> Any:
    return _KeyMaskingFlow(
        fn, name="imagebatch", persist_result=False, validate_parameters=False, log_prints=False
    )


@_flow
async def imagebatch_flow(
    jobs: str | list[dict[str, Any]],
    out: str | None = None,
    config: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    retry_failed: bool = False,
    force: bool = False,
    allow_changed_settings: bool = False,
    models: str | None = None,
    out_root: str | None = None,
) -> Any:
    """Run jobs (a CSV or Parquet path, or a list of row objects) into `out`, or into a new
    dated folder under `out_root` (scheduled and deployed runs: never over an earlier run).

    The parameters are plain JSON so the flow can be deployed and scheduled. API keys are
    never parameters: they come from the environment of the process that runs the flow, or
    from the Prefect Secret block named by `[api] key_secret`. The final state is Failed
    when the run stopped early, or (by default, `[flow] fail_on_image_errors`) when any
    image did not succeed; its message carries the counts.
    """
    # Only module-level names here: `serve` cloudpickles this function by value, and a
    # module global such as a ContextVar cannot travel (functions go by reference).
    return await _run_flow(
        _Params(
            jobs,  # type: ignore[arg-type]  # rows are turned into a frame by _handoff_for
            out,
            config,
            _refuse_key_parameter(overrides),
            retry_failed,
            force,
            allow_changed_settings,
            models,
        ),
        out_root,
    )


async def _run_flow(params: _Params, out_root: str | None) -> Any:
    """The flow run around `_execute`: its folder, its key, its UI reporting, its final state."""
    started = time.time()
    handoff = _handoff.get()
    lock: Any = contextlib.nullcontext()
    if handoff is None or handoff.ref != params.jobs:
        # Called directly (a deployment, a schedule): load the settings and lock the folder here.
        params, handoff = _handoff_for(params, out_root)
        lock = FolderLock(_out_dir(params.out, handoff.settings))
    settings = _with_overrides(handoff.settings, params.overrides)
    if settings.api.key_secret:
        key = await load_secret_key(settings.api.key_secret)
        api = {**params.overrides.get("api", {}), "api_key": key}  # in memory only
        params = replace(params, overrides={**params.overrides, "api": api})
    progress = ProgressArtifact()
    reporter = UiReporter(handoff.reporter or LogReporter(), progress)
    with lock:
        try:
            report = await _execute(params, replace(handoff, reporter=reporter))
        finally:
            await progress.finish()
    elapsed = time.time() - started
    await publish_summary(report.rows, elapsed, report.stopped, report.skipped, str(report.out_dir))
    if out_root:
        mark_latest(report.out_dir)
    return final_state(report, settings.flow.fail_on_image_errors)


def _refuse_key_parameter(
    overrides: dict[str, dict[str, Any]] | None,
) -> dict[str, dict[str, Any]]:
    """A key passed as a parameter would be stored in Prefect's database: refuse it."""
    overrides = dict(overrides or {})
    if "api_key" in overrides.get("api", {}):
        raise ConfigError(
            "the API key is never a run parameter (it would be stored in Prefect's database): "
            "set OPENAI_API_KEY where the run executes, or name a Prefect Secret block with key_secret"
        )
    return overrides


def _with_overrides(settings: Settings, overrides: dict[str, dict[str, Any]]) -> Settings:
    for section, values in overrides.items():
        settings = settings.with_overrides(section, **values)
    return settings


def _handoff_for(params: _Params, out_root: str | None) -> tuple[_Params, _Handoff]:
    """A deployed run's handoff: its settings, its rows as a frame, its dated folder."""
    settings = load_settings(params.config)
    frame = None
    jobs: Any = params.jobs
    if not isinstance(jobs, str):
        if not isinstance(jobs, list) or not all(isinstance(r, dict) for r in jobs):
            raise InputError("jobs must be a path to a CSV/Parquet file or a list of row objects")
        import pandas as pd

        frame = pd.DataFrame.from_records(jobs)
        jobs = f"rows:{len(frame)}"
    out = str(_run_folder(out_root)) if out_root else params.out
    params = replace(params, jobs=jobs, out=out)
    return params, _Handoff(jobs, frame, None, settings)


def _run_folder(out_root: str) -> Path:
    """This flow run's own dated folder under `out_root`, named by its (scheduled) start."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    flow_run = ctx.flow_run if ctx is not None else None
    when = (flow_run.expected_start_time if flow_run else None) or dt.datetime.now(dt.UTC)
    run_id = flow_run.id.hex if flow_run else uuid.uuid4().hex
    return dated_folder(Path(out_root).expanduser().resolve(), when, run_id)


def state_message(report: RunReport) -> str:
    """`12 images: 10 succeeded, 1 failed, 1 invalid` (+ why the run stopped, if it did)."""
    parts = [f"{n} {status}" for status, n in report.counts.items() if n]
    message = f"{len(report.rows)} images: {', '.join(parts) or 'none'}"
    if report.skipped:
        message += f" ({report.skipped} already done before)"
    if report.stopped:
        message += f"; stopped early: {report.stopped}"
    return message + f"; output {report.out_dir}"


def final_state(report: RunReport, fail_on_image_errors: bool) -> Any:
    """Failed when the run stopped early, or when images were lost and that is to fail."""
    from prefect.states import Completed, Failed

    failed = bool(report.stopped) or (fail_on_image_errors and report.exit_code != 0)
    return (Failed if failed else Completed)(message=state_message(report), data=report)


@dataclass(frozen=True)
class _Params:
    """The flow's parameters."""

    jobs: str
    out: str | None
    config: str | None
    overrides: dict[str, dict[str, Any]]
    retry_failed: bool
    force: bool
    allow_changed: bool
    models: str | None


@dataclass(frozen=True)
class _Handoff:
    """What the caller gives a flow run beyond its JSON parameters: the DataFrame, the
    reporter, and the settings it loaded (the output folder is already locked)."""

    ref: str
    frame: pd.DataFrame | None
    reporter: Reporter | None
    settings: Settings


# Set by run_jobs for the flow run it starts; deployments run without it.
_handoff: contextvars.ContextVar[_Handoff | None] = contextvars.ContextVar(
    "imagebatch_handoff", default=None
)


@dataclass
class _Run:
    """One run's fixed context, shared by the steps of `_execute`."""

    params: _Params
    settings: Settings
    limits: LimitSettings
    registry: Registry
    out_dir: Path
    source: Any
    base_dir: Path
    reporter: Reporter
    prices: PriceBook
    started: float = field(default_factory=time.time)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    batch_stats: dict[str, Any] = field(default_factory=dict)  # --batch: the batches' counters
    thumbnailer: Thumbnailer | None = None  # thumbnails made while the run waits


async def _execute(params: _Params, handoff: _Handoff) -> RunReport:
    """The run as a sequence of steps; the caller holds the folder lock."""
    run = _setup(params, handoff)
    simulator = None
    try:
        previous = _check_folder(run)
        jobs: list[Job] = read_jobs(run.source)
        run.settings, simulator = _target(run.settings, run.reporter)
        if run.settings.batch.mode == "batch":
            check_batch_target(run.settings.api)
            if simulator is not None:
                run.settings = _wait_for_simulated_batches(run.settings, run.reporter)
        checked = _validate(run, jobs)
        planned = plan_jobs(checked.valid)
        files = _open_output(run, previous)
        store, journal, records = files.store, files.journal, files.records
        work, skipped = files.pending_work(
            planned, retry_failed=params.retry_failed, force=params.force
        )
        files.make_room(work)
        plan = _cost_plan(run, work)
        dispatcher = _dispatcher(run, store, journal, records)
        run.reporter.start(sum(len(idx) for _, idx in work), skipped)
        dispatch_seconds = await _dispatch(run, dispatcher, work, records, planned)
        manifest = _write_manifest(
            jobs, planned, checked.invalid, files, run.settings, run.reporter
        )
        report = _report(run, dispatcher, manifest, checked.problems, simulator, skipped)
        this_run = [r for r in records.values() if r.run_id == run.run_id]
        report.cost = cost_report(plan, dispatcher.budget, this_run)
        _write_final_run_json(run, report, dispatch_seconds)
        if run.thumbnailer is not None:
            run.thumbnailer.close()
        notice = publish_after_run(
            run.out_dir, manifest, read_run_json(run.out_dir) or {}, run.settings.gallery
        )
        if notice:
            run.reporter.notice(notice)
        return report
    finally:
        if run.thumbnailer is not None:
            run.thumbnailer.close()
        if simulator is not None:
            simulator.stop()


def _setup(params: _Params, handoff: _Handoff) -> _Run:
    """Settings with the run's overrides, the registry, the output folder and the jobs source."""
    settings = handoff.settings
    for section, values in params.overrides.items():
        settings = settings.with_overrides(section, **values)
    registry = Registry.load(params.models)
    limits = resolve_limits(settings)
    source: Any = handoff.frame if handoff.frame is not None else params.jobs
    base_dir = (
        Path(params.jobs).expanduser().resolve().parent if isinstance(source, str) else Path.cwd()
    )
    reporter = handoff.reporter or LogReporter()
    out_dir = _out_dir(params.out, handoff.settings)
    prices = PriceBook.load(settings.cost.prices or None)
    return _Run(params, settings, limits, registry, out_dir, source, base_dir, reporter, prices)


def _cost_plan(run: _Run, work: list[tuple[PlannedJob, list[int]]]) -> CostPlan:
    """The estimate of what this run sets out to send (Batch API lines at the batch price)."""
    batch = run.settings.batch.mode == "batch"
    return cost_plan(
        run.prices,
        (u for p, idx in work for u in units_for(p, idx)),
        batch=(lambda unit: refusal(unit) is None) if batch else None,
    )


def _check_folder(run: _Run) -> dict[str, Any] | None:
    """The folder's last run.json; refuses a folder made with other shaping settings."""
    previous = read_run_json(run.out_dir)
    if not (run.params.allow_changed or run.params.force):
        check_shaping(previous, _shaping(run.settings))
    return previous


def _validate(run: _Run, jobs: list[Job]) -> Checked:
    validator = Validator.from_settings(
        run.registry,
        run.settings,
        targets_openai=run.settings.api.targets_openai,
        base_dir=run.base_dir,
    )
    checked = validator.check(jobs)
    run.reporter.problems(checked.problems)
    return checked


def _open_output(run: _Run, previous: dict[str, Any] | None) -> Files:
    """The image store, the journal (open) and its records so far, with any moves a crash
    interrupted finished; run.json marked in progress."""
    store = ImageStore(run.out_dir)
    store.prepare()
    journal = Journal(run.out_dir, sync_first=(store.staging_dir, store.images_dir))
    files = Files(store, journal, journal.load())
    journal.open()
    files.recover()
    # Record what shapes the images before the first one is written, so a run killed
    # midway still protects its folder against a rerun with other defaults.
    write_run_json(
        run.out_dir, {**(previous or {}), "shaping": _shaping(run.settings), "in_progress": True}
    )
    return files


def _dispatcher(
    run: _Run, store: ImageStore, journal: Journal, records: dict[str, ImageRecord]
) -> Dispatcher:
    """The dispatcher, with a fresh limiter, client and budget; finished images update
    `records`. The budget's caps count what earlier runs into the folder spent."""
    limiter = Limiter.from_settings(run.limits)
    cost = run.settings.cost
    budget = Budget(
        Decimal(str(cost.max_cost)) if cost.max_cost else None,
        Decimal(str(cost.max_cost_total)) if cost.max_cost_total else None,
        journal.spent()[0],
    )
    client = ImagesClient(run.settings.api, max_connections=run.limits.max_in_flight_ceiling)
    dispatcher = Dispatcher(
        client,
        limiter,
        run.settings.retry,
        store,
        journal,
        run.run_id,
        budget=budget,
        prices=run.prices,
    )
    reporter = run.reporter
    gallery = run.settings.gallery
    if gallery.enabled:
        spec = ThumbSpec(size=gallery.thumb_size, format=gallery.thumb_format)
        run.thumbnailer = Thumbnailer(run.out_dir, spec)
    thumbnailer = run.thumbnailer

    def on_image(record: ImageRecord) -> None:
        # A not_run with a reason (the cost cap) shows in the manifest; it is never journaled.
        if record.status != "not_run" or record.error_code:
            records[record.key] = record
        if thumbnailer is not None and record.status == "succeeded" and record.file:
            thumbnailer.submit(record.file, record.sha256)
        reporter.image(record)

    dispatcher.on_image = on_image
    dispatcher.keep_prepared = run.settings.inputs.keep_prepared
    return dispatcher


async def _dispatch(
    run: _Run,
    dispatcher: Dispatcher,
    work: list[tuple[PlannedJob, list[int]]],
    records: dict[str, ImageRecord],
    planned: list[PlannedJob],
) -> float:
    """Fan the work out as Prefect tasks, or through the Batch API (`[batch] mode`); returns
    the seconds it took. Closes client and journal."""
    flow_settings = run.settings.flow
    token = current_dispatcher.set(dispatcher)
    started = time.time()
    memory.tune_for_run()

    def live(part: list[tuple[PlannedJob, list[int]]]) -> Any:
        return _FanOut(dispatcher, flow_settings).run(part)

    try:
        with (
            _interrupts(dispatcher, run.reporter, asyncio.current_task()),
            quiet_expected_failures(),
        ):
            if run.settings.batch.mode == "batch":
                run.batch_stats = await run_batch_phase(
                    run.settings,
                    dispatcher,
                    records,
                    planned,
                    work,
                    run.reporter.notice,
                    dispatcher.on_image,
                    live,
                )
            else:
                await live(work)
    except asyncio.CancelledError:
        dispatcher.halt(KeyboardInterrupt("interrupted twice: requests in flight were abandoned"))
    finally:
        current_dispatcher.reset(token)
        run.reporter.finish()
        await dispatcher.client.aclose()
        dispatcher.journal.close()
        memory.give_back()  # what the busiest moment left free, before manifest and gallery
    return time.time() - started


def _report(
    run: _Run,
    dispatcher: Dispatcher,
    manifest: Manifest,
    problems: list[Problem],
    simulator: Any,
    skipped: int,
) -> RunReport:
    statuses = manifest.column("status")
    counts = {s: statuses.count(s) for s in STATUSES}
    stopped = None
    if dispatcher.fatal is not None:
        stopped = str(dispatcher.fatal) or type(dispatcher.fatal).__name__
    stats = {**dict(dispatcher.stats), "limiter": dispatcher.limiter.snapshot()}
    if run.settings.batch.mode == "batch":
        stats["batch"] = run.batch_stats
    if simulator is not None:
        stats["simulator"] = simulator.stats()
    used_simulator = simulator is not None
    return RunReport(
        run.out_dir, counts, manifest, problems, used_simulator, stopped, skipped, stats
    )


def _write_final_run_json(run: _Run, report: RunReport, dispatch_seconds: float) -> None:
    settings, params = run.settings, run.params
    api = settings.api
    write_run_json(
        run.out_dir,
        {
            "run_id": run.run_id,
            "started_at": dt.datetime.fromtimestamp(run.started, dt.UTC).isoformat(),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            "seconds": round(time.time() - run.started, 3),
            "dispatch_seconds": round(dispatch_seconds, 3),
            "jobs": params.jobs if isinstance(run.source, str) else "<DataFrame>",
            "simulator": report.used_simulator,
            "base_url": mask_url(api.base_url),
            "counts": report.counts,
            "skipped_already_done": report.skipped,
            "stopped": report.stopped,
            "stats": report.stats,
            "cost": report.cost,
            "shaping": _shaping(settings),
            "settings": {
                "job": asdict(settings.job),
                "limits": asdict(run.limits),
                "retry": asdict(settings.retry),
                "inputs": asdict(settings.inputs),
                "cost": asdict(settings.cost),
                "api": {
                    **{k: v for k, v in asdict(api).items() if k not in ("api_key",)},
                    "base_url": mask_url(api.base_url),
                },
            },
            "versions": _versions(),
        },
    )


def _wait_for_simulated_batches(settings: Settings, reporter: Reporter) -> Settings:
    """The built-in simulator stops with the run: its batches can only be collected now."""
    if not settings.batch.wait:
        reporter.notice(
            "--no-wait ignored: the built-in simulator stops with this run, so its batches "
            "could not be collected later"
        )
    return settings.with_overrides("batch", wait=True)


def _target(settings: Settings, reporter: Reporter) -> tuple[Settings, Any]:
    """Where requests go: the configured API, or (only when asked) a simulator started here."""
    api = settings.api
    check_target(api)
    if not api.uses_simulator:
        return settings, None
    from imagebatch.simulator import SimConfig, SimulatorServer

    sim = settings.simulator
    simulator = SimulatorServer(
        SimConfig(latency=sim.latency, rpm=round(sim.rpm), ipm=round(sim.ipm))
    ).start()
    ignored = " (OPENAI_API_KEY and OPENAI_BASE_URL are ignored)" if api.api_key else ""
    reporter.notice(
        f"--simulate: using the built-in simulator at {simulator.base_url}{ignored}. "
        "Images are synthetic and nothing is billed."
    )
    return settings.with_overrides(
        "api", base_url=simulator.base_url, api_key="sk-simulator"
    ), simulator


def _write_manifest(
    jobs: list[Job],
    planned: list[PlannedJob],
    invalid: dict[int, list[Problem]],
    files: Files,
    settings: Settings,
    reporter: Reporter,
) -> Manifest:
    """Rebuild the manifest from the journal's records; the tool's files that no row names
    move from images/ to superseded/ (files it did not write are never touched)."""
    rows = build_rows(jobs, {p.job.job.row: p for p in planned}, invalid, files.records)
    extra = list(jobs[0].extra) if jobs else []
    renamed = {k: v for k, v in carried_names(extra).items() if k != v}
    if renamed:
        reporter.notice(
            "carried-through column(s) named like manifest columns are kept as "
            + ", ".join(f"{k!r} -> {v!r}" for k, v in renamed.items())
        )
    manifest = Manifest.build(rows, extra, getattr(jobs, "extra_dtypes", None))
    referenced = {r["file"] for r in manifest.with_status("succeeded") if r.get("file")}
    moved, error = files.set_aside(referenced)
    if moved:
        reporter.notice(
            f"{len(moved)} image(s) under images/ belong to no row of these jobs (rows removed "
            "or changed): moved to superseded/, where a later run of those rows finds them"
        )
    if error:
        reporter.notice(f"images no row names stay in images/: {error}")
    write_manifest(manifest, files.out_dir, settings.manifest_formats)
    return manifest


def run_jobs(
    jobs: str | Path | pd.DataFrame,
    out: str | Path | None = None,
    *,
    config: str | Path | None = None,
    models: str | Path | None = None,
    retry_failed: bool = False,
    force: bool = False,
    allow_changed_settings: bool = False,
    reporter: Reporter | None = None,
    **overrides: Any,
) -> RunReport:
    """Run jobs (a CSV/Parquet path or a DataFrame) and return the report; `report.manifest` is a DataFrame.

    Overrides are settings by name: model, size, quality, n, output_format (job defaults),
    rpm, ipm, max_in_flight, tier (limits), base_url, read_timeout (api), on_ambiguous (retry),
    max_cost, max_cost_total, prices (cost).
    """
    sections = route_overrides(overrides)
    frame = is_frame(jobs)
    ref = f"dataframe:{uuid.uuid4().hex}" if frame else str(jobs)
    settings = load_settings(config)
    _preflight(settings, sections)
    read_jobs(jobs)  # a jobs table that cannot be read stops here: one line, no output folder
    # Locked before Prefect starts, so a second run refuses at once however slow Prefect is.
    with FolderLock(_out_dir(out, settings)):
        api = prefect_api.choose()
        if reporter is not None:
            reporter = prefect_api.Announcing(reporter, api)
        elif (message := api.message()) is not None:
            log.info(message)
        handoff = _Handoff(ref, jobs if frame else None, reporter, settings)
        token = _handoff.set(handoff)
        try:
            coro = imagebatch_flow(
                ref,
                str(out) if out else None,
                str(config) if config else None,
                sections,
                retry_failed,
                force,
                allow_changed_settings,
                str(models) if models else None,
                return_state=True,
            )
            with prefect_api.use(api), quiet_console(), _quiet_expected_errors():
                return asyncio.run(_report_of(coro))
        finally:
            _handoff.reset(token)


async def _report_of(call: Any) -> RunReport:
    """The report a finished run carries in its state, Completed or Failed; errors re-raised."""
    state = await call
    result = await state.aresult(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    if not isinstance(result, RunReport):
        raise RuntimeError(
            f"the flow run ended {state.type.value} without a report: {state.message}"
        )
    return result


def _preflight(settings: Settings, sections: dict[str, dict[str, Any]]) -> None:
    """Usage errors found before anything touches the disk (no output folder is created)."""
    for section, values in sections.items():
        settings = settings.with_overrides(section, **values)
    check_target(settings.api)
    settings.flow.uses_chunks(0)  # task_per="jobs" from Python: refused here, not mid-run


def _out_dir(out: str | Path | None, settings: Settings) -> Path:
    """The output folder, created if needed (the lock lives in it)."""
    path = Path(out or settings.output_dir).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the output folder {path}: {exc.strerror or exc}"
        ) from None
    return path
