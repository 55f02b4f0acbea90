"""Hand a run to the team's workers from a notebook, and collect its manifest later.

    sub = imagebatch.submit(df, out_root="/shared/runs")   # returns at once
    sub.url                                              # the run in Prefect's UI
    manifest = imagebatch.wait(sub)                      # blocks until it finishes

`submit` triggers the deployment declared in prefect.yaml (default `imagebatch/catalog`) on
the Prefect server in PREFECT_API_URL. Jobs go as a path the workers can read, or as a
DataFrame sent as rows in the run's parameters; those are stored in Prefect's database, so
large frames are refused (save them to shared storage and pass the path). The API key is
never sent: workers use their own environment or a Secret block (`key_secret=`).
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagebatch.configs.settings import route_overrides
from imagebatch.runner import call_blocking
from imagebatch.tasks.errors import ConfigError, OutputError
from imagebatch.tasks.read_jobs import is_frame

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_DEPLOYMENT = "imagebatch/catalog"
MAX_ROWS = 5_000
MAX_PARAMETER_BYTES = 2_000_000
SUMMARY_KEY = "imagebatch-summary"


@dataclass(frozen=True)
class Submitted:
    """A run handed to the workers: its id and where to watch it."""

    flow_run_id: str
    url: str | None
    deployment: str

    def _repr_html_(self) -> str:
        link = html.escape(self.url or "")
        return (
            f"imagebatch run <code>{html.escape(self.flow_run_id)}</code> on "
            f"<code>{html.escape(self.deployment)}</code>: <a href='{link}' target='_blank'>{link}</a>"
        )


def rows_parameter(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A DataFrame as JSON rows for a run parameter; refused above the size limit."""
    if len(frame) > MAX_ROWS:
        raise ConfigError(
            f"{len(frame)} rows is more than {MAX_ROWS} to send as run parameters (they are "
            "stored in Prefect's database): save the frame where the workers can read it "
            "(df.to_parquet('/shared/jobs.parquet')) and submit that path"
        )
    rows: list[dict[str, Any]] = json.loads(frame.to_json(orient="records", date_format="iso"))
    size = len(json.dumps(rows))
    if size > MAX_PARAMETER_BYTES:
        raise ConfigError(
            f"these rows are {size:,} bytes as JSON, more than {MAX_PARAMETER_BYTES:,} to send as "
            "run parameters: save the frame where the workers can read it and submit that path"
        )
    return rows


def submit(
    jobs: str | Path | pd.DataFrame,
    *,
    out_root: str | None = None,
    deployment: str = DEFAULT_DEPLOYMENT,
    config: str | None = None,
    **settings: Any,
) -> Submitted:
    """Trigger the deployment with these jobs and return at once (id and UI link).

    `jobs`: a path as the workers see it, or a DataFrame (sent as rows, at most 5,000).
    `out_root`: where the workers write the run's dated folder (default: the deployment's).
    Other keywords are settings by name (model, quality, ipm, key_secret, ...).
    """
    if "api_key" in settings:
        raise ConfigError(
            "the API key is never sent with a run (it would be stored in Prefect's database): "
            "set it on the workers, or pass key_secret= with the name of a Prefect Secret block"
        )
    params: dict[str, Any] = {"jobs": rows_parameter(jobs) if is_frame(jobs) else str(jobs)}
    if settings:
        params["overrides"] = route_overrides(settings)
    if out_root is not None:
        params["out_root"] = str(out_root)
    if config is not None:
        params["config"] = str(config)
    return call_blocking(lambda: asyncio.run(_trigger(deployment, params)))


async def _trigger(deployment: str, params: dict[str, Any]) -> Submitted:
    from prefect import get_client
    from prefect.deployments import arun_deployment
    from prefect.utilities.urls import url_for

    if "overrides" in params:
        # Prefect merges parameters one level deep: settings given here are laid over the
        # deployment's own overrides (its key_secret, say), not put in their place.
        async with get_client() as client:
            declared = (await client.read_deployment_by_name(deployment)).parameters
        merged = {k: dict(v) for k, v in (declared.get("overrides") or {}).items()}
        for section, values in params["overrides"].items():
            merged.setdefault(section, {}).update(values)
        params = {**params, "overrides": merged}
    flow_run = await arun_deployment(deployment, parameters=params, timeout=0, as_subflow=False)
    return Submitted(str(flow_run.id), url_for(flow_run), deployment)


def wait(run: Submitted | str, *, timeout: float = 6 * 3600, poll: float = 2.0) -> pd.DataFrame:
    """Wait for a submitted run to finish and return its manifest (read from its folder).

    `manifest.attrs["imagebatch"]` holds the state, its message and the folder. A run that
    ended without a manifest (it crashed, or its folder cannot be read from here) raises.
    """
    run_id = run.flow_run_id if isinstance(run, Submitted) else str(run)
    state, message, out_dir = call_blocking(lambda: asyncio.run(_wait(run_id, timeout, poll)))
    if out_dir is None:
        raise OutputError(f"run {run_id} ended {state} without a manifest: {message}")
    import pandas as pd

    folder = Path(out_dir)
    for name, read in (("manifest.parquet", pd.read_parquet), ("manifest.csv", pd.read_csv)):
        if (folder / name).is_file():
            manifest = read(folder / name)
            break
    else:
        raise OutputError(
            f"run {run_id} ended {state} and wrote its manifest to {folder} on the worker, "
            "which cannot be read from here (use an out_root on storage both can reach)"
        )
    manifest.attrs["imagebatch"] = {
        "flow_run_id": run_id,
        "state": state,
        "message": message,
        "out_dir": str(folder),
    }
    return manifest


async def _wait(run_id: str, limit: float, poll: float) -> tuple[str, str, str | None]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    deadline = time.monotonic() + limit
    async with get_client() as client:
        while True:
            flow_run = await client.read_flow_run(run_id)  # type: ignore[arg-type]
            if flow_run.state is not None and flow_run.state.is_final():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not finish within {limit:.0f} s")
            await asyncio.sleep(poll)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    state = flow_run.state
    out_dir = None
    for artifact in artifacts:
        if artifact.key == SUMMARY_KEY:
            out_dir = _output_folder(artifact.data)
    return (state.name or "?") if state else "?", (state.message or "") if state else "", out_dir


def _output_folder(data: Any) -> str | None:
    rows = json.loads(data) if isinstance(data, str) else data
    for row in rows or []:
        if isinstance(row, dict) and row.get("what") == "output folder":
            return str(row.get("value"))
    return None
