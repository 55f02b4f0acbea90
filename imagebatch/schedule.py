"""`imagebatch serve`: one command that registers a scheduled deployment and runs it here.

For teams without a work pool. Prefect's ephemeral API has no scheduler (a schedule served
against it never fires), so this refuses to start without a real server in PREFECT_API_URL.
Runs execute in subprocesses of this one (Prefect's runner), importing the flow by module
path, so they need only imagebatch installed, not this checkout.
"""

from __future__ import annotations

import zoneinfo
from pathlib import Path
from typing import Any

from imagebatch.configs.settings import check_target, load_settings, route_overrides
from imagebatch.tasks.errors import ConfigError


def flow_parameters(
    jobs: Path,
    out_root: Path,
    *,
    config: Path | None = None,
    models: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The deployment's parameters: absolute paths (runs start in another working directory)
    and settings by section. Checked now, so a typo fails here and not at 02:00."""
    sections = route_overrides(overrides or {})
    settings = load_settings(config)
    for section, values in sections.items():
        settings = settings.with_overrides(section, **values)
    check_target(settings.api)
    params: dict[str, Any] = {
        "jobs": str(jobs.expanduser().resolve()),
        "out_root": str(out_root.expanduser().resolve()),
        "overrides": sections,
    }
    if config:
        params["config"] = str(config.expanduser().resolve())
    if models:
        params["models"] = str(models.expanduser().resolve())
    return params


def serve_schedule(
    jobs: Path,
    out_root: Path,
    *,
    cron: str,
    timezone: str = "UTC",
    name: str = "scheduled",
    config: Path | None = None,
    models: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Serve the flow on `cron` until interrupted (blocks)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConfigError(
            "serve needs a Prefect server: start one (`prefect server start`) and set "
            "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api); the temporary API has no scheduler"
        )
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"unknown time zone {timezone!r} (use a name like Europe/Berlin)"
        ) from None
    try:
        schedule = Cron(cron, timezone=timezone)
    except ValueError as exc:
        raise ConfigError(f"--cron {cron!r} is not a cron expression: {exc}") from None
    params = flow_parameters(jobs, out_root, config=config, models=models, overrides=overrides)
    from imagebatch.flows.run_jobs import imagebatch_flow

    imagebatch_flow.serve(
        name=name,
        schedules=[schedule],
        parameters=params,
        entrypoint_type=EntrypointType.MODULE_PATH,
        pause_on_shutdown=True,
    )
