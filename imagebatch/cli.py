"""imagebatch: bulk image jobs against the OpenAI Images API or any server that speaks it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from imagebatch.configs.registry import CHOICES

F = TypeVar("F", bound=Callable[..., Any])

# Quiet, offline-friendly Prefect defaults; a user's own environment wins.
PREFECT_DEFAULTS = {
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's server, in this process or its temporary subprocess, logs CancelledError
    # tracebacks at exit (events its own ephemeral server drops); not ours to show.
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "",
}


def _console():
    from rich.console import Console

    # Text from a jobs file or a server is data: no emoji codes, no highlighting; markup is
    # used only for our own words, and every piece of data goes through `escape` (or `_fail`).
    return Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def escape(text: object) -> str:
    """`text` made literal for rich markup (`[/]`, `[link=...]` print as they are)."""
    from rich.markup import escape as _escape

    return _escape(str(text))


class ConsoleReporter:
    """Progress bar while running, problems and notices as they come."""

    def __init__(self, quiet: bool = False) -> None:
        self.console = _console()
        self.quiet = quiet
        self.progress: Any = None
        self.task: Any = None

    def notice(self, message: str) -> None:
        self.console.print(f"[yellow]{escape(message)}[/]")

    def problems(self, problems: list[Any]) -> None:
        errors = [p for p in problems if p.severity == "error"]
        warnings = [p for p in problems if p.severity != "error"]
        for p in errors:
            self.console.print(f"[red]invalid[/] {escape(p)}")
        for p in warnings[:20]:
            self.console.print(f"[yellow]warning[/] {escape(p)}")
        if len(warnings) > 20:
            self.console.print(f"[yellow]… and {len(warnings) - 20} more warnings[/]")

    def start(self, total: int, skipped: int) -> None:
        if skipped:
            self.console.print(
                f"{skipped} image(s) already done in this folder: skipped, not requested again"
            )
        if self.quiet or not total:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("images"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.counts: dict[str, int] = {}
        self.task = self.progress.add_task("images", total=total, status="")
        self.progress.start()

    def image(self, record: Any) -> None:
        if self.progress is None:
            return
        self.counts[record.status] = self.counts.get(record.status, 0) + 1
        status = " ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        self.progress.update(self.task, advance=1, status=status)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _summary(report: Any) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title=f"imagebatch: {escape(report.out_dir)}", show_header=True)
    table.add_column("status")
    table.add_column("images", justify="right")
    for status in ("succeeded", "failed", "rejected", "invalid", "not_run"):
        if report.counts.get(status):
            table.add_row(status, str(report.counts[status]))
    console.print(table)
    stats = report.stats
    extras = []
    if report.skipped:
        extras.append(f"{report.skipped} already done before this run")
    if stats.get("retries"):
        extras.append(f"{stats['retries']} retries")
    if stats.get("rate_limited"):
        extras.append(f"{stats['rate_limited']} rate-limit answers (429)")
    if stats.get("ambiguous"):
        extras.append(
            f"{stats['ambiguous']} request(s) sent again after a lost or unusable answer "
            "the server may have billed: those images may have been paid twice"
        )
    if extras:
        console.print("; ".join(extras))
    _cost_summary(console, report.cost)
    console.print(f"manifest: {escape(report.out_dir / 'manifest.csv')}")
    if report.used_simulator:
        console.print("[yellow]These images came from the built-in simulator, not from OpenAI.[/]")
    if report.stopped:
        console.print(f"[red]The run stopped early: {escape(report.stopped)}[/]")


def _usd(amount: Any) -> str:
    return "unknown" if amount is None else f"${amount:,.4f}"


def _cost_summary(console: Any, cost: dict[str, Any]) -> None:
    """Spend of the run against its estimate, what may have been paid twice, and the cap."""
    if not cost:
        return
    parts = [f"cost {_usd(cost['actual_usd'])} this run"]
    if cost.get("images_compared"):
        parts.append(
            f"the {cost['images_compared']} image(s) made with an estimate cost "
            f"{_usd(cost['actual_usd_of_made'])} against {_usd(cost['estimated_usd_of_made'])} "
            "estimated"
        )
    if cost.get("unestimated_images"):
        parts.append(f"{cost['unestimated_images']} image(s) made had no estimate")
    if cost.get("unpriced_calls"):
        parts.append(f"{cost['unpriced_calls']} call(s) with no price (unknown)")
    if cost.get("possibly_paid_twice_images"):
        parts.append(
            f"{cost['possibly_paid_twice_images']} image(s) may have been paid twice: "
            f"up to {_usd(cost['possibly_paid_usd'])}"
        )
    if cost.get("folder_spent_before_usd"):
        parts.append(f"folder total {_usd(cost['folder_spent_usd'])}")
    console.print("; ".join(parts))
    if cost.get("stopped_by_cap"):
        console.print(
            f"[yellow]Dispatching stopped at the cost cap: {escape(cost['stopped_by_cap'])}. "
            "The images not sent are not_run (reason 'cost cap'); re-run with a higher cap "
            "to make them.[/]"
        )


def _print_plan(est: Any) -> None:
    """The plan of a dry run or `validate`: requests, images and their estimated cost."""
    console = _console()
    plan = est.plan
    console.print(
        f"Plan: {plan.jobs} jobs, {plan.requests} requests, {plan.images} images (nothing sent)"
    )
    for line in plan.lines:
        what = " ".join(v for v in (line.model, line.operation, line.size, line.quality) if v)
        console.print(
            f"  {escape(what)}: {line.requests} request(s), {line.images} image(s), "
            f"{_usd(line.usd)} ({escape(line.basis)})"
        )
    if est.skipped:
        console.print(f"{est.skipped} image(s) already done in the output folder: not counted")
    unknown = (
        f"; {plan.unknown_images} image(s) with no price: unknown" if plan.unknown_images else ""
    )
    console.print(
        f"Estimated cost: {_usd(plan.usd)} (worst case {_usd(plan.worst_usd)}){unknown}. "
        "Billing follows the response's usage; prices from configs/prices.toml "
        "(checked dates and sources there; override with --prices)."
    )
    if est.folder_spent:
        console.print(f"Earlier runs into the output folder spent {_usd(est.folder_spent)}")
    caps = (
        ("--max-cost", est.max_cost, plan.worst_usd),
        ("--max-cost-total", est.max_cost_total, plan.worst_usd + est.folder_spent),
    )
    for flag, cap, worst in caps:
        if cap is None:
            continue
        if plan.unknown_images:
            console.print(f"[yellow]{flag} {_usd(cap)}: unpriced images will not be sent[/]")
        if worst <= cap:
            console.print(f"Worst case {_usd(worst)} fits under {flag} {_usd(cap)}")
        else:
            console.print(
                f"[yellow]Worst case {_usd(worst)} exceeds {flag} {_usd(cap)}: "
                "dispatching would stop before the end[/]"
            )


def _fail(message: str, code: int = 2) -> None:
    """Print one literal line (the message is data: paths, server text) and exit."""
    _console().print(f"[red]Error:[/] {escape(message)}")
    sys.exit(code)


_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


class ByteCount(click.ParamType):
    """A byte count: 256000000, 256MB, 256MiB, 1GB (decimal and binary units)."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("kmgib")
        unit = text[len(number) :]
        try:
            amount = float(number)
        except ValueError:
            amount = -1.0
        if unit not in _BYTE_UNITS or not amount >= 0 or amount * _BYTE_UNITS[unit] >= 2**63:
            self.fail(f"{value!r} is not a byte count such as 256MB, 1GB or 0", param, ctx)
        return int(amount * _BYTE_UNITS[unit])


def config_option(what: str = "") -> Callable[[F], F]:
    """`--config`, the same on every command; `what` says which settings matter there."""
    return click.option(
        "--config",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help=f"A TOML file overriding configs/defaults.toml{what}.",
    )


models_option = click.option(
    "--models",
    "models_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A TOML file adding or overriding models in the registry.",
)
prices_option = click.option(
    "--prices",
    type=click.Path(exists=True, dir_okay=False),
    help="A TOML file overlaying configs/prices.toml (prices change; no code needed).",
)


def row_defaults(command: F) -> F:
    """`--model`, `--size`, `--quality`: defaults for rows that leave those cells empty."""
    for name in ("quality", "size", "model"):  # applied bottom-up: listed model, size, quality
        command = click.option(f"--{name}", help=f"Default {name} for rows that leave it empty.")(
            command
        )
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imagebatch")
def main() -> None:
    """Bulk image jobs against the OpenAI Images API, or any server that speaks it.

    Give it a CSV of jobs (one row per prompt or source image, each with its own model,
    size, quality and count); get back images/ and a manifest with one row per image.

    Set OPENAI_API_KEY (and OPENAI_BASE_URL for another server), or try it with
    `imagebatch run JOBS.csv --simulate` against a built-in simulator.
    """
    # Before any command imports Prefect, which reads its settings once.
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


@main.command()
@click.argument("jobs", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default: out).",
)
@row_defaults
@click.option("--n", "n", type=int, help="Default images per row.")
@click.option(
    "--output-format",
    type=click.Choice(CHOICES["output_format"]),
    help="Default output_format (GPT image models).",
)
@click.option("--rpm", type=float, help="Requests per minute allowed (0: learn it).")
@click.option("--ipm", type=float, help="Images per minute allowed (0: learn it).")
@click.option(
    "--max-in-flight",
    type=int,
    help="Requests in flight at most (0: derive from the limit and latency).",
)
@click.option(
    "--max-bytes-in-flight",
    type=ByteCount(),
    help="Memory budget: answers in memory at once, e.g. 128MB or 1GB (default 256MB; 0: none).",
)
@click.option("--tier", help="Rate-limit preset from the config, e.g. openai-tier-3.")
@click.option(
    "--base-url", help="API base URL (default: $OPENAI_BASE_URL or https://api.openai.com/v1)."
)
@click.option("--org", "organization", help="OpenAI organization id (default: $OPENAI_ORG_ID).")
@click.option("--project", help="OpenAI project id (default: $OPENAI_PROJECT_ID).")
@click.option(
    "--read-timeout",
    type=float,
    help="Seconds of silence allowed while an answer comes (default 360); the whole request "
    "is bounded by [api] request_deadline (default: the timeouts + 120 s).",
)
@click.option(
    "--request-deadline",
    type=click.FloatRange(min=0),
    help="Seconds a request may take in all before its answer counts as lost "
    "(default 0: the timeouts + 120 s).",
)
@click.option(
    "--on-ambiguous",
    type=click.Choice(["retry", "fail"]),
    help="A request lost after sending: retry it (may pay twice) or fail it.",
)
@click.option(
    "--task-per",
    type=click.Choice(["auto", "job", "chunk"]),
    help="Prefect tasks: one per job, one per chunk of [flow] chunk_jobs jobs, or auto "
    "(default): per job up to [flow] auto_chunk_above jobs to run, chunks above.",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Also redo images that failed, were rejected or did not run.",
)
@click.option("--force", is_flag=True, help="Redo every image, even finished ones.")
@click.option(
    "--allow-changed-settings",
    is_flag=True,
    help="Run into a folder made with other defaults; affected images are redone.",
)
@config_option()
@models_option
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0),
    help="Stop dispatching before this run's spend (USD, worst case of requests in flight "
    "included) could pass this; the rest become not_run. Default: [cost] max_cost, 0 = none.",
)
@click.option(
    "--max-cost-total",
    type=click.FloatRange(min=0),
    help="The same cap for the output folder's total: what earlier runs into it spent counts.",
)
@prices_option
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan (requests, images, estimated cost) and exit; nothing is sent.",
)
@click.option(
    "--strict-models/--no-strict-models",
    default=None,
    help="Refuse rows whose model is not in the registry (default: send them unchecked, with a warning).",
)
@click.option(
    "--simulate",
    is_flag=True,
    default=None,
    help="Run against a built-in simulator: synthetic images, nothing billed.",
)
@click.option(
    "--batch",
    "mode",
    flag_value="batch",
    default=None,
    help="Send through OpenAI's Batch API: half price, results within 24 hours.",
)
@click.option(
    "--wait/--no-wait",
    default=None,
    help="With --batch: wait for the batches (default), or submit, record and exit 0; "
    "rerunning the same command collects them.",
)
@click.option(
    "--key-secret",
    help="Name of a Prefect Secret block holding the API key (instead of $OPENAI_API_KEY).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def run(
    jobs: Path,
    out: Path | None,
    config: Path | None,
    models_file: Path | None,
    retry_failed: bool,
    force: bool,
    allow_changed_settings: bool,
    dry_run: bool,
    quiet: bool,
    **overrides: Any,
) -> None:
    """Run the jobs in JOBS (CSV or Parquet) and write images plus a manifest.

    \b
    Output folder:
      images/           one file per image, <job id>_<index>.<ext>
      manifest.csv      one row per requested image (also manifest.parquet)
      journal.jsonl     what is done; a re-run into the folder does only the rest
      run.json          settings, versions, counts and timings of the last run
    \b
    Exit status: 0 every image succeeded; 1 some did not (see the manifest);
    2 usage error, or the run stopped early (bad key, quota, Ctrl-C, disk full).

    Prefect: the run uses the server in PREFECT_API_URL, else one started with
    `prefect server start --background` (same PREFECT_HOME), else it serves Prefect's API
    from its own process (several seconds to start); it says which.
    """
    from imagebatch.tasks.errors import ImagebatchError

    if not overrides.get("simulate"):
        overrides["simulate"] = None  # not given: the config decides
    if dry_run:
        _dry_run(jobs, out, config, models_file, retry_failed, force, overrides)
    from imagebatch.flows.run_jobs import run_jobs

    reporter = ConsoleReporter(quiet=quiet)
    try:
        report = run_jobs(
            jobs,
            out,
            config=config,
            models=models_file,
            retry_failed=retry_failed,
            force=force,
            allow_changed_settings=allow_changed_settings,
            reporter=reporter,
            **overrides,
        )
    except ImagebatchError as exc:
        reporter.finish()
        _fail(str(exc))
    except KeyboardInterrupt:
        reporter.finish()
        _fail("interrupted")
    _summary(report)
    sys.exit(report.exit_code)


def _dry_run(
    jobs: Path,
    out: Path | None,
    config: Path | None,
    models_file: Path | None,
    retry_failed: bool,
    force: bool,
    overrides: dict[str, Any],
) -> None:
    """`run --dry-run`: validate and price the jobs as the run would, then exit."""
    from imagebatch.api import estimate
    from imagebatch.tasks.errors import ImagebatchError

    try:
        est = estimate(
            jobs,
            out,
            config=config,
            models=models_file,
            retry_failed=retry_failed,
            force=force,
            **overrides,
        )
    except ImagebatchError as exc:
        _fail(str(exc))
    ConsoleReporter().problems(est.checked.problems)
    _print_plan(est)
    sys.exit(1 if est.checked.invalid else 0)


@main.command()
@click.argument("jobs", type=click.Path(dir_okay=False, path_type=Path))
@row_defaults
@click.option(
    "--base-url",
    help="The server the run would target (decides whether retired models are errors).",
)
@click.option(
    "--simulate",
    is_flag=True,
    default=None,
    help="Judge rows as for a --simulate run (retired models are warnings).",
)
@config_option()
@models_option
@prices_option
@click.option(
    "--strict-models/--no-strict-models",
    default=None,
    help="Refuse rows whose model is not in the registry (default: send them unchecked, with a warning).",
)
def validate(jobs: Path, config: Path | None, models_file: Path | None, **overrides: Any) -> None:
    """Check every row of JOBS against its model's rules and print the plan with its
    estimated cost; send nothing.

    Exit status 0 when every row is valid, 1 when any row is not, 2 when JOBS cannot be read.
    """
    if not overrides.get("simulate"):
        overrides["simulate"] = None
    from imagebatch.api import estimate
    from imagebatch.tasks.errors import ImagebatchError

    try:
        est = estimate(jobs, config=config, models=models_file, **overrides)
    except ImagebatchError as exc:
        _fail(str(exc))
    ConsoleReporter().problems(est.checked.problems)
    bad = len(est.checked.invalid)
    _console().print(f"{est.rows} rows: {est.rows - bad} valid, {bad} invalid")
    _print_plan(est)
    sys.exit(1 if bad else 0)


@main.command("jobs-from-folder")
@click.argument(
    "folder", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR"
)
@click.option(
    "--operation", required=True, type=click.Choice(["edit", "variation"]), help="Row operation."
)
@click.option("--prompt", default="", help="The prompt for every row (edits need one).")
@click.option(
    "--model",
    default=None,
    help="Model for every row (default: dall-e-2 for variations, else the run default).",
)
@click.option(
    "--mask-suffix",
    default="_mask",
    show_default=True,
    help="x_mask.png is the mask of x.jpg (edits); mask files never become rows.",
)
@click.option("--size", default=None, help="Size for every row.")
@click.option("--n", "n", type=int, default=None, help="Images per row.")
@click.option(
    "--fit",
    type=click.Choice(["crop", "pad", "error"]),
    help="How to make sources square where the model needs it.",
)
@click.option("--recursive", "-r", is_flag=True, help="Include images in subfolders.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The jobs CSV to write (default: DIR/jobs.csv). Image paths are relative to it.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing jobs file.")
def jobs_from_folder_cmd(
    folder: Path,
    operation: str,
    prompt: str,
    model: str | None,
    mask_suffix: str,
    size: str | None,
    n: int | None,
    fit: str | None,
    recursive: bool,
    output: Path | None,
    force: bool,
) -> None:
    """Write a jobs CSV with one edit or variation row per image in DIR.

    x.jpg is paired with x_mask.png (any image extension, see --mask-suffix). Run the
    result with `imagebatch run DIR/jobs.csv --out OUT`.
    """
    from rich.markup import escape

    from imagebatch.tasks.errors import ImagebatchError
    from imagebatch.tasks.files import write_atomic
    from imagebatch.tasks.folder_jobs import jobs_from_folder

    output = output or folder / "jobs.csv"
    if output.exists() and not force:
        _fail(f"{output} exists; pass --force to overwrite it")
    extra = {k: str(v) for k, v in (("size", size), ("n", n), ("fit", fit)) if v is not None}
    if model is None:
        model = "dall-e-2" if operation == "variation" else ""
    try:
        found = jobs_from_folder(
            folder,
            output,
            operation=operation,
            prompt=prompt,
            model=model,
            mask_suffix=mask_suffix,
            recursive=recursive,
            extra=extra,
        )
    except ImagebatchError as exc:
        _fail(str(exc))
    console = _console()
    if not found.rows:
        _fail(f"no images in {folder}", 1)
    for mask in found.unpaired_masks:
        console.print(
            f"[yellow]warning[/] {escape(mask.name)} is a mask with no image of that name"
        )
    write_atomic(output, found.csv_bytes())
    paired = sum(1 for row in found.rows if row["mask"])
    console.print(
        f"{escape(str(output))}: {len(found.rows)} {operation} row(s)"
        + (f", {paired} with a mask" if operation == "edit" else "")
    )
    if any(row["image"].startswith("../") for row in found.rows):
        console.print(
            "[yellow]The images are outside the jobs file's folder: runs refuse them unless "
            "[inputs] allow_outside_sources or sources_root says so.[/]"
        )


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@config_option(" ([gallery] settings)")
@click.option(
    "--contact-sheet",
    type=click.IntRange(min=0),
    help="Also write contact_sheet.png with the first N succeeded images (0: no).",
)
def report(folder: Path, config: Path | None, contact_sheet: int | None) -> None:
    """Summarize the run folder FOLDER and rebuild its page and dataset metadata.

    \b
    Prints counts by status and by model, the failures grouped by reason, the
    elapsed time and images per minute; then rewrites FOLDER/index.html (open
    it in a browser), FOLDER/thumbs/ and FOLDER/metadata.jsonl (load it with
    datasets.load_dataset("imagefolder", data_dir=FOLDER)). Nothing else in
    FOLDER is changed.
    """
    from imagebatch.configs.settings import load_settings
    from imagebatch.tasks.errors import ImagebatchError
    from imagebatch.tasks.outdir import FolderLock
    from imagebatch.tasks.report import open_run_folder, publish, summarize

    try:
        settings = load_settings(config).with_overrides("gallery", contact_sheet=contact_sheet)
        run_folder = open_run_folder(folder)
        with FolderLock(run_folder.out_dir):
            written = publish(
                run_folder.out_dir, run_folder.manifest, run_folder.run, settings.gallery
            )
    except ImagebatchError as exc:
        _fail(str(exc))
    _print_summary(summarize(run_folder), written)


def _print_summary(summary: Any, written: list[Path]) -> None:
    from rich.table import Table
    from rich.text import Text

    from imagebatch.tasks.report import format_seconds

    console = _console()
    console.print(Text(f"imagebatch run folder {summary.out_dir}", style="bold"))
    table = Table(show_header=True, title="images by status and model")
    table.add_column("model")
    for status in summary.statuses:
        table.add_column(status, justify="right")
    for model, counts in summary.by_model.items():
        table.add_row(Text(str(model)), *(str(counts[s]) for s in summary.statuses))
    table.add_row(Text("all", style="bold"), *(str(summary.counts[s]) for s in summary.statuses))
    console.print(table)
    if summary.failures:
        failures = Table(show_header=True, title="not succeeded, by reason")
        for col in ("images", "status", "reason", "example"):
            failures.add_column(col, justify="right" if col == "images" else "left")
        for status, code, images, example in summary.failures:
            failures.add_row(str(images), status, Text(code), Text(example[:300]))
        console.print(failures)
    if summary.seconds is not None:
        line = f"last run: {format_seconds(summary.seconds)}"
        if summary.dispatch_seconds is not None:
            line += f" ({format_seconds(summary.dispatch_seconds)} sending requests)"
        if summary.made_last_run is not None:
            line += f", {summary.made_last_run} image(s) made"
        if summary.images_per_minute is not None:
            line += f", {summary.images_per_minute:.1f} images per minute"
        console.print(Text(line))
    for note in summary.notes:
        console.print(Text(note, style="yellow"))
    for path in written:
        console.print(Text(f"wrote {path}"))


@main.command()
@click.argument("jobs", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--cron", required=True, help='When to run, e.g. "0 2 * * *" (02:00 daily).')
@click.option("--timezone", default="UTC", show_default=True, help="Time zone of the cron.")
@click.option(
    "--out-root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Each run writes into its own dated folder here; `latest` names the newest.",
)
@click.option("--name", default="scheduled", show_default=True, help="The deployment's name.")
@row_defaults
@click.option("--n", "n", type=int, help="Default images per row.")
@click.option("--ipm", type=float, help="Images per minute allowed (0: learn it).")
@click.option("--rpm", type=float, help="Requests per minute allowed (0: learn it).")
@click.option("--tier", help="Rate-limit preset from the config, e.g. openai-tier-3.")
@click.option("--base-url", help="API base URL (default: $OPENAI_BASE_URL, in this process).")
@click.option(
    "--key-secret",
    help="Name of a Prefect Secret block holding the API key (else $OPENAI_API_KEY here).",
)
@click.option(
    "--simulate",
    is_flag=True,
    default=None,
    help="Each run goes to a built-in simulator: synthetic images, nothing billed.",
)
@config_option()
@models_option
def serve(
    jobs: Path,
    cron: str,
    timezone: str,
    out_root: Path,
    name: str,
    config: Path | None,
    models_file: Path | None,
    **overrides: Any,
) -> None:
    """Run JOBS on a schedule, from this process, until stopped (Ctrl-C).

    Registers the deployment imagebatch/NAME on the Prefect server in $PREFECT_API_URL and
    runs each scheduled or triggered run here. Each run writes into its own dated folder
    under --out-root (never over an earlier run); OUT_ROOT/latest and OUT_ROOT/LATEST name
    the newest finished one. The API key comes from this process's environment or the named
    Secret block, never from the run's parameters.
    """
    from imagebatch.schedule import serve_schedule
    from imagebatch.tasks.errors import ImagebatchError

    try:
        serve_schedule(
            jobs,
            out_root,
            cron=cron,
            timezone=timezone,
            name=name,
            config=config,
            models=models_file,
            overrides=overrides,
        )
    except ImagebatchError as exc:
        _fail(str(exc))


@main.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (keep it on loopback).",
)
@click.option("--port", "-p", default=8787, show_default=True, type=int)
@click.option(
    "--latency", default=0.5, show_default=True, type=float, help="Seconds each request takes."
)
@click.option("--rpm", default=0, type=float, help="Requests per minute before 429 (0: unlimited).")
@click.option("--ipm", default=0, type=float, help="Images per minute before 429 (0: unlimited).")
@click.option("--api-key", default=None, help="Require this bearer key (default: any key).")
def simulate(
    host: str, port: int, latency: float, rpm: float, ipm: float, api_key: str | None
) -> None:
    """Serve an OpenAI-compatible Images API for tests and dry runs.

    Point a run at it with OPENAI_BASE_URL=http://HOST:PORT/v1 and any OPENAI_API_KEY.
    Prompts containing the word "forbidden" get the model's moderation refusal.
    See `python -m imagebatch.simulator --help` for fault injection knobs.
    """
    from imagebatch.simulator import SimConfig
    from imagebatch.simulator.server import serve_forever

    _console().print(f"Simulator on http://{host}:{port}/v1 (Ctrl-C to stop)")
    serve_forever(
        SimConfig(latency=latency, rpm=round(rpm), ipm=round(ipm), api_key=api_key), host, port
    )


@main.command()
@models_option
@click.option(
    "--check",
    is_flag=True,
    help="Ask the target's GET /models which registry models it serves, which image models "
    "it serves that the registry lacks, and which registry models it does not list.",
)
@click.option(
    "--base-url", help="The server to check (default: $OPENAI_BASE_URL or api.openai.com)."
)
@config_option(" (api_type, api_version)")
def models(
    models_file: Path | None, check: bool, base_url: str | None, config: Path | None
) -> None:
    """List the models in the registry and what they accept.

    Dated snapshots (gpt-image-2-2026-04-21) need no entry: they have their base
    model's rules. With --check, compare the registry with what the target serves
    (exit 2 when the target cannot be asked).
    """
    from rich.console import Console
    from rich.table import Table

    from imagebatch.configs.registry import Registry
    from imagebatch.tasks.errors import ImagebatchError

    try:
        registry = Registry.load(models_file)
    except ImagebatchError as exc:
        _fail(str(exc))
    if check:
        _check_models(registry, base_url, config)
        return
    table = Table(show_header=True)
    table.add_column("model", no_wrap=True)  # names are what users copy: never cut
    for col in ("operations", "n/call", "sizes", "qualities", "retired on api.openai.com"):
        table.add_column(col)
    for name in registry.names():
        m = registry.get(name)
        assert m is not None  # names() lists only registered models
        sizes = ", ".join(s if s != "flexible" else "WxH (rule)" for s in m.sizes)
        table.add_row(
            name,
            ", ".join(m.endpoints),
            str(m.max_n_per_call),
            sizes,
            ", ".join(m.qualities),
            m.retired.isoformat() if m.retired else "",
        )
    Console().print(table)
    Console().print(
        "A dated snapshot "
        "(<model>-YYYY-MM-DD) has its model's rules; a model not listed is sent unchecked "
        "(--strict-models refuses it)."
    )


def _check_models(registry: Any, base_url: str | None, config: Path | None) -> None:
    """`models --check`: what the target lists against what the registry knows."""
    from rich.console import Console
    from rich.markup import escape

    from imagebatch.configs.settings import OPENAI_BASE_URL, load_settings
    from imagebatch.tasks.errors import ImagebatchError
    from imagebatch.tasks.model_check import check_models

    try:
        api = load_settings(config).with_overrides("api", base_url=base_url).api
    except ImagebatchError as exc:
        _fail(str(exc))
    if not api.api_key and api.base_url == OPENAI_BASE_URL:
        _fail(
            "models --check needs a target: set OPENAI_API_KEY for api.openai.com, or "
            "OPENAI_BASE_URL (or --base-url) for another server"
        )
    try:
        result = check_models(api, registry)
    except ImagebatchError as exc:
        from imagebatch.tasks.redact import mask_url

        _fail(f"cannot list the models of {mask_url(api.base_url)}: {exc}")
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"{escape(result.url)} lists {result.listed} model(s).")
    sections = (
        ("Registry models it serves", result.served, ""),
        (
            "Image models it serves that the registry does not know",
            result.unknown,
            "They run unchecked (one warning per model); add them to a models TOML file "
            "(--models / IMAGEBATCH_MODELS) to check their rules.",
        ),
        ("Registry models it does not list", result.missing, ""),
    )
    for title, names, hint in sections:
        out.print(f"\n[bold]{title}[/] ({len(names)}):")
        for name in names:
            out.print(f"  {escape(name)}")
        if names and hint:
            out.print(f"  [dim]{hint}[/]")


@main.group()
def batch() -> None:
    """Batches submitted by `run --batch` into an output folder."""


def _batch_api(config: Path | None) -> Any:
    from imagebatch.configs.settings import load_settings
    from imagebatch.tasks.batch_api import BatchApi

    settings = load_settings(config)
    if settings.api.has_no_target or settings.api.uses_simulator:
        _fail(
            "set OPENAI_API_KEY (and OPENAI_BASE_URL for another server) to reach the server "
            "that holds the batches; the built-in simulator keeps none between runs"
        )
    return BatchApi(settings.api, settings.retry)


@batch.command("status")
@click.argument("out", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def batch_status_cmd(out: Path, config: Path | None) -> None:
    """Show every batch recorded in the output folder OUT and its state on the server."""
    import asyncio

    from rich.markup import escape
    from rich.table import Table

    from imagebatch.tasks.batch import batch_status

    async def go() -> list[dict[str, Any]]:
        async with _batch_api(config) as api:
            return await batch_status(out, api)

    rows = asyncio.run(go())
    if not rows:
        _fail(f"no batches are recorded in {out}", 1)
    table = Table(title=f"batches: {out}")
    for col in ("batch", "endpoint", "requests", "status", "completed", "failed"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            escape(str(r["batch_id"] or r["part"])),
            r["endpoint"],
            str(r["requests"]),
            escape(str(r["status"])),
            "" if r.get("completed") is None else str(r["completed"]),
            "" if r.get("failed") is None else str(r["failed"]),
        )
    _console().print(table)
    if any(not r["collected"] and not r["dropped"] for r in rows):
        _console().print("Collect finished batches by rerunning the same `imagebatch run` command.")


@batch.command("cancel")
@click.argument("out", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def batch_cancel_cmd(out: Path, config: Path | None) -> None:
    """Cancel every unfinished batch recorded in the output folder OUT.

    What a batch finished before cancelling is still collected by the next run; the rest
    of its images become not_run (batch_cancelled) and a later run submits them again."""
    import asyncio

    from rich.markup import escape

    from imagebatch.tasks.batch import batch_cancel

    async def go() -> list[tuple[str, str]]:
        async with _batch_api(config) as api:
            return await batch_cancel(out, api)

    results = asyncio.run(go())
    if not results:
        _fail(f"no unfinished batches are recorded in {out}", 1)
    for batch_id, status in results:
        _console().print(f"{escape(batch_id)}: {escape(status)}")


if __name__ == "__main__":
    main()
