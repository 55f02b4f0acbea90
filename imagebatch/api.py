"""The Python API for notebooks, scripts and async code.

import imagebatch
manifest = imagebatch.run("jobs.csv", out="out", model="gpt-image-2")   # a DataFrame
manifest = await imagebatch.arun(df, out="out")                       # from async code
report = imagebatch.run_report(df, out="out")   # counts, problems, stats, .manifest
checked = imagebatch.validate(df)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagebatch.configs.prices import PriceBook
from imagebatch.configs.registry import Registry
from imagebatch.configs.settings import Settings, load_settings, route_overrides
from imagebatch.notebook import make_reporter
from imagebatch.runner import call_async, call_blocking
from imagebatch.tasks.cost import CostPlan, cost_plan
from imagebatch.tasks.journal import Journal
from imagebatch.tasks.plan import RequestUnit, plan_jobs, units_for
from imagebatch.tasks.read_jobs import read_jobs
from imagebatch.tasks.validate import Checked, Validator

if TYPE_CHECKING:
    import pandas as pd

    from imagebatch.flows.run_jobs import RunReport


def _validator(
    jobs: str | Path | pd.DataFrame, settings: Settings, models: str | Path | None
) -> Validator:
    """The validator a run would use: sources resolve against the jobs file's folder, and
    retired models are errors only where the run would go to api.openai.com."""
    base_dir = (
        Path(jobs).expanduser().resolve().parent
        if isinstance(jobs, (str, os.PathLike))
        else Path.cwd()
    )
    return Validator.from_settings(
        Registry.load(models),
        settings,
        targets_openai=settings.api.targets_openai,
        base_dir=base_dir,
    )


def check_jobs(
    jobs: str | Path | pd.DataFrame,
    *,
    config: str | Path | None = None,
    models: str | Path | None = None,
    model: str | None = None,
    size: str | None = None,
    quality: str | None = None,
    base_url: str | None = None,
    strict_models: bool | None = None,
    simulate: bool | None = None,
) -> tuple[Checked, int]:
    """Validate every row as `run` would, sending nothing. Returns the result and the row count."""
    settings = load_settings(config).with_overrides("job", model=model, size=size, quality=quality)
    settings = settings.with_overrides("api", base_url=base_url, simulate=simulate)
    settings = settings.with_overrides("registry", strict_models=strict_models)
    rows = read_jobs(jobs)
    return _validator(jobs, settings, models).check(rows), len(rows)


def validate(jobs: str | Path | pd.DataFrame, **kwargs: Any) -> Checked:
    """Check jobs against the model rules; `result.problems` lists every row, column and rule broken."""
    return check_jobs(jobs, **kwargs)[0]


def run(
    jobs: str | Path | pd.DataFrame,
    out: str | Path | None = None,
    *,
    progress: bool | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Run jobs and return the manifest: one row per requested image.

    Works in scripts and in notebooks (Jupyter, IPython, VS Code) alike: inside a running
    event loop the run gets its own loop in a worker thread. `progress`: None shows a bar in
    a notebook or on a terminal, True always, False never. `manifest.attrs["imagebatch"]`
    holds the output folder, counts, exit code and why the run stopped early, if it did.
    Other arguments as for `run_report`.
    """
    return _with_attrs(run_report(jobs, out, progress=progress, **kwargs))


async def arun(
    jobs: str | Path | pd.DataFrame,
    out: str | Path | None = None,
    *,
    progress: bool | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """`run` for async code: `manifest = await imagebatch.arun(df, out="out")`.

    The caller's loop keeps running; cancelling the awaiting task stops the run as Ctrl-C
    does (requests in flight finish, the manifest is written)."""
    call = _call(jobs, out, progress, kwargs)
    return _with_attrs(await call_async(call))


def run_report(
    jobs: str | Path | pd.DataFrame,
    out: str | Path | None = None,
    *,
    progress: bool | None = None,
    **kwargs: Any,
) -> RunReport:
    """Run jobs and return the full RunReport (`.manifest`, `.counts`, `.problems`, `.stats`).

    Keyword arguments: config, models, retry_failed, force, allow_changed_settings,
    key_secret (the name of a Prefect Secret block holding the API key), and any setting
    by name (model, size, quality, n, ipm, rpm, max_in_flight, tier, base_url,
    read_timeout, on_ambiguous, task_per, simulate, ...). See flows.run_jobs.run_jobs.
    `simulate=True` runs against a built-in simulator (synthetic images, nothing billed);
    with no OPENAI_API_KEY, no OPENAI_BASE_URL and no `simulate=True` the run is refused.
    """
    return call_blocking(_call(jobs, out, progress, kwargs))


def _call(
    jobs: str | Path | pd.DataFrame,
    out: str | Path | None,
    progress: bool | None,
    kwargs: dict[str, Any],
) -> Callable[[], RunReport]:
    from imagebatch.flows.run_jobs import run_jobs

    if "reporter" not in kwargs:
        kwargs["reporter"] = make_reporter(progress)
    return lambda: run_jobs(jobs, out, **kwargs)


def _with_attrs(report: RunReport) -> pd.DataFrame:
    report.manifest.attrs["imagebatch"] = {
        "out_dir": str(report.out_dir),
        "counts": report.counts,
        "exit_code": report.exit_code,
        "stopped": report.stopped,
    }
    return report.manifest


def _batchable(unit: RequestUnit) -> bool:
    """A `--batch` run sends this unit through the Batch API (at the batch price)."""
    from imagebatch.tasks.batch_lines import refusal

    return refusal(unit) is None


@dataclass
class CostEstimate:
    """What a run would send, and what it would cost (`imagebatch run --dry-run`)."""

    checked: Checked
    rows: int
    plan: CostPlan
    skipped: int  # images already done in the output folder, not counted
    prices: PriceBook
    max_cost: Decimal | None
    max_cost_total: Decimal | None
    folder_spent: Decimal  # what earlier runs into the output folder spent


def estimate(
    jobs: str | Path | pd.DataFrame,
    out: str | Path | None = None,
    *,
    config: str | Path | None = None,
    models: str | Path | None = None,
    retry_failed: bool = False,
    force: bool = False,
    **overrides: Any,
) -> CostEstimate:
    """Plan a run and price it, sending nothing and writing nothing.

    With `out`, images its journal lists as succeeded are left out (as a run would skip
    them; their files are not re-verified here). Settings by name as for `run`, plus
    `prices` (a TOML file overlaying configs/prices.toml) and `max_cost`/`max_cost_total`.
    """
    settings = load_settings(config)
    for section, values in route_overrides(overrides).items():
        settings = settings.with_overrides(section, **values)
    rows = read_jobs(jobs)
    checked = _validator(jobs, settings, models).check(rows)
    done: dict[str, Any] = {}
    journal = Journal(Path(out).expanduser()) if out is not None else None
    if journal is not None and not force:
        done = {
            key: rec
            for key, rec in journal.load().items()
            if rec.status == "succeeded" or not retry_failed
        }
    units: list[RequestUnit] = []
    skipped = 0
    for planned in plan_jobs(checked.valid):
        todo = [i for i, key in enumerate(planned.keys) if key not in done]
        skipped += planned.job.n - len(todo)
        units.extend(units_for(planned, todo))
    cost = settings.cost
    book = PriceBook.load(cost.prices or None)
    return CostEstimate(
        checked,
        len(rows),
        cost_plan(book, units, batch=_batchable if settings.batch.mode == "batch" else None),
        skipped,
        book,
        Decimal(str(cost.max_cost)) if cost.max_cost else None,
        Decimal(str(cost.max_cost_total)) if cost.max_cost_total else None,
        journal.spent()[0] if journal is not None else Decimal(0),
    )
