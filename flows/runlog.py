"""What a run says, sent to Prefect's UI as well as to the person watching.

`UiReporter` wraps the CLI's or notebook's reporter: notices, problems and the run's outline go
to the flow run's log (Prefect's run logger, via its API handler) and the progress artifact,
and still to the wrapped reporter. The terminal stays as it was: `quiet_console` keeps
Prefect's per-run log lines (including the engine's "Finished in state ...") off the console
while our own reporter draws there; the UI receives them all the same.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from imagebatch.tasks.artifacts import ProgressArtifact

# Our run log: sent to the flow run's log through Prefect's API handler only, whatever
# PREFECT_LOGGING_LEVEL says about Prefect's own chatter.
MAX_PROBLEMS_LOGGED = 200


def run_logger() -> logging.LoggerAdapter | None:
    """Prefect's run logger for the current flow run, writing to the UI but not the console."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger
    from prefect.logging.handlers import APILogHandler

    try:
        adapter = get_run_logger()
    except MissingContextError:
        return None
    logger = logging.getLogger("imagebatch.run")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the person watching sees our reporter, not a log line
    return logging.LoggerAdapter(logger, dict(getattr(adapter, "extra", None) or {}))


class UiReporter:
    """A reporter that also writes to the flow run's log and moves the progress artifact."""

    def __init__(self, inner: Any, progress: ProgressArtifact) -> None:
        self.inner = inner
        self.progress = progress
        self.log = run_logger()
        self._failures_logged = 0

    def _info(self, message: str, *args: Any) -> None:
        if self.log is not None:
            self.log.info(message, *args)

    def notice(self, message: str) -> None:
        if self.log is not None:
            self.log.warning("%s", message)
        if self.inner is not None:
            self.inner.notice(message)

    def problems(self, problems: list[Any]) -> None:
        if self.log is not None:
            for p in problems[:MAX_PROBLEMS_LOGGED]:
                self.log.warning("%s: %s", p.severity, p)
            if len(problems) > MAX_PROBLEMS_LOGGED:
                self.log.warning(
                    "... and %d more problems: see the manifest",
                    len(problems) - MAX_PROBLEMS_LOGGED,
                )
        if self.inner is not None:
            self.inner.problems(problems)

    def start(self, total: int, skipped: int) -> None:
        self._info("%d image(s) to request; %d already done in this folder", total, skipped)
        self.progress.begin(total)
        if self.inner is not None:
            self.inner.start(total, skipped)

    def image(self, record: Any) -> None:
        if (
            record.status != "succeeded"
            and self.log is not None
            and self._failures_logged < MAX_PROBLEMS_LOGGED
        ):
            self._failures_logged += 1
            self.log.warning(
                "image %s #%s %s: %s %s",
                record.job_id,
                record.index,
                record.status,
                record.error_code or "",
                record.error_message or "",
            )
        self.progress.image_done()
        if self.inner is not None:
            self.inner.image(record)

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.finish()


class _NotRunLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))


@contextlib.contextmanager
def quiet_console() -> Iterator[None]:
    """Keep flow- and task-run log lines off the console for a CLI or notebook run."""
    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    quiet = _NotRunLogs()
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)
