"""The flow's dispatch phase in batch mode: Batch API first, live only for what it cannot carry.

    submit (resume the ledger, new input files, upload, create) -> live units run meanwhile
    -> wait (poll, collect, resubmit transient failures) -> live retries -> pending marked

The images, journal and manifest are the live run's; `run_live` is the live fan-out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from imagebatch.configs.settings import Settings
from imagebatch.tasks.batch import BatchRun, Work
from imagebatch.tasks.batch_api import BatchApi
from imagebatch.tasks.dispatch import Dispatcher
from imagebatch.tasks.errors import OutputError
from imagebatch.tasks.journal import ImageRecord
from imagebatch.tasks.plan import PlannedJob

log = logging.getLogger("imagebatch")


async def run_batch_phase(
    settings: Settings,
    dispatcher: Dispatcher,
    records: dict[str, ImageRecord],
    planned: list[PlannedJob],
    work: Work,
    notice: Callable[[str], None],
    on_record: Callable[[ImageRecord], None],
    run_live: Callable[[Work], Awaitable[None]],
) -> dict[str, Any]:
    """Send `work` through the Batch API; returns the batch counters for run.json."""
    async with BatchApi(settings.api, settings.retry) as api:
        run = BatchRun(
            api,
            settings.batch,
            dispatcher.store,
            dispatcher.journal,
            records,
            planned,
            dispatcher.run_id,
            dispatcher.client.download,
            notice,
            on_record,
            on_progress=_artifact,
            stop=dispatcher.stop,
            budget=dispatcher.budget,
            prices=dispatcher.prices,
        )
        try:
            live = await run.submit(work)
            if live and not dispatcher.stop.is_set():
                await run_live(live)
            if settings.batch.wait and not dispatcher.stop.is_set():
                retries = await run.wait()
                if retries and not dispatcher.stop.is_set():
                    await run_live(retries)
        except OutputError as error:
            dispatcher.halt(error)
        finally:
            pending = run.mark_pending()
            if run.fatal is not None:
                dispatcher.halt(run.fatal)
        if pending and not settings.batch.wait and not dispatcher.stop.is_set():
            notice(
                f"{pending} image(s) submitted to the Batch API. Collect them by rerunning the "
                "same command (it waits and downloads), or check on them with "
                f"`imagebatch batch status {dispatcher.store.out_dir}`."
            )
        return run.stats


async def _artifact(rows: list[dict[str, Any]]) -> None:
    """The batches' progress as a Prefect table artifact (only inside a flow run)."""
    from prefect.artifacts import acreate_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    try:
        await acreate_table_artifact(
            table=rows,
            key="imagebatch-batches",
            description="Batch API batches of this run: status and requests completed/failed",
        )
    except Exception as exc:  # progress reporting must never stop the run
        log.warning("could not publish the batch progress artifact: %s", exc)
