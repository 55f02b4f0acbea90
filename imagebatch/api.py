"""The Python API for notebooks and scripts.

import imagebatch
manifest = imagebatch.run("jobs.csv", out="out", model="gpt-image-2")   # a DataFrame
report = imagebatch.run_report(df, out="out")   # counts, problems, stats, .manifest
checked = imagebatch.validate(df)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from imagebatch.configs.registry import Registry
from imagebatch.configs.settings import load_settings
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
) -> tuple[Checked, int]:
    """Validate every row as `run` would, sending nothing. Returns the result and the row count."""
    settings = load_settings(config).with_overrides("job", model=model, size=size, quality=quality)
    settings = settings.with_overrides("api", base_url=base_url)
    rows = read_jobs(jobs)
    # With no key and no base URL a run goes to the simulator, so retired models are only warnings.
    targets_openai = settings.api.targets_openai and not settings.api.uses_simulator
    base_dir = (
        Path(jobs).expanduser().resolve().parent
        if not isinstance(jobs, pd.DataFrame)
        else Path.cwd()
    )
    validator = Validator(
        Registry.load(models), settings.job, targets_openai=targets_openai, base_dir=base_dir
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
    read_timeout, on_ambiguous, task_per, ...). See flows.run_jobs.run_jobs.
    """
    from imagebatch.flows.run_jobs import run_jobs

    return run_jobs(jobs, out, **kwargs)
