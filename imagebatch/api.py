"""The Python API for notebooks and scripts.

import imagebatch
manifest = imagebatch.run("jobs.csv", out="out", model="gpt-image-2")   # a DataFrame
report = imagebatch.run_report(df, out="out")   # counts, problems, stats, .manifest
checked = imagebatch.validate(df)
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd

from imagebatch.configs.prices import PriceBook
from imagebatch.configs.registry import Registry
from imagebatch.configs.settings import load_settings, route_overrides
from imagebatch.tasks.cost import CostPlan, cost_plan
from imagebatch.tasks.journal import Journal
from imagebatch.tasks.plan import RequestUnit, plan_jobs, units_for
from imagebatch.tasks.read_jobs import read_jobs
from imagebatch.tasks.validate import Checked, Validator


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
    # Retired models are errors only where the run would go to api.openai.com.
    targets_openai = settings.api.targets_openai
    base_dir = (
        Path(jobs).expanduser().resolve().parent
        if not isinstance(jobs, pd.DataFrame)
        else Path.cwd()
    )
    validator = Validator.from_settings(
        Registry.load(models), settings, targets_openai=targets_openai, base_dir=base_dir
    )
    return validator.check(rows), len(rows)


def validate(jobs: str | Path | pd.DataFrame, **kwargs: Any) -> Checked:
    """Check jobs against the model rules; `result.problems` lists every row, column and rule broken."""
    return check_jobs(jobs, **kwargs)[0]


def run(
    jobs: str | Path | pd.DataFrame, out: str | Path | None = None, **kwargs: Any
) -> pd.DataFrame:
    """Run jobs and return the manifest: one row per requested image.

    `manifest.attrs["imagebatch"]` holds the output folder, counts, exit code and why the
    run stopped early, if it did. Arguments as for `run_report`.
    """
    report = run_report(jobs, out, **kwargs)
    report.manifest.attrs["imagebatch"] = {
        "out_dir": str(report.out_dir),
        "counts": report.counts,
        "exit_code": report.exit_code,
        "stopped": report.stopped,
    }
    return report.manifest


def run_report(jobs: str | Path | pd.DataFrame, out: str | Path | None = None, **kwargs: Any):
    """Run jobs and return the full RunReport (`.manifest`, `.counts`, `.problems`, `.stats`).

    Keyword arguments: config, models, retry_failed, force, allow_changed_settings, and any
    setting by name (model, size, quality, n, ipm, rpm, max_in_flight, tier, base_url,
    read_timeout, on_ambiguous, task_per, simulate, ...). See flows.run_jobs.run_jobs.
    `simulate=True` runs against a built-in simulator (synthetic images, nothing billed);
    with no OPENAI_API_KEY, no OPENAI_BASE_URL and no `simulate=True` the run is refused.
    """
    from imagebatch.flows.run_jobs import run_jobs

    return run_jobs(jobs, out, **kwargs)


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
    targets_openai = settings.api.targets_openai
    base_dir = (
        Path(jobs).expanduser().resolve().parent
        if not isinstance(jobs, pd.DataFrame)
        else Path.cwd()
    )
    validator = Validator.from_settings(
        Registry.load(models), settings, targets_openai=targets_openai, base_dir=base_dir
    )
    checked = validator.check(rows)
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
