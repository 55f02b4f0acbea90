"""What a run shows on Prefect's Artifacts page: live progress, then a summary and the failures.

- `imagebatch-progress`: a progress artifact updated as images finish. An update is an API
  call of about 50 ms, so it moves in steps of at least 2% (and at most once a second), never
  per image, and never blocks the requests: updates run one at a time in the background.
- `imagebatch-summary`: a table of counts by status and model, elapsed time, images per
  minute and the images that may have been paid twice.
- `imagebatch-failures`: a markdown list of every image that did not succeed, with its
  reason. Prompts, ids and server messages are data, so they are escaped, never rendered.

Artifacts need a flow run; outside one (a task's logic called directly) these do nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import Counter
from typing import Any

from imagebatch.tasks.manifest import Manifest

log = logging.getLogger("imagebatch")

PROGRESS_KEY = "imagebatch-progress"
SUMMARY_KEY = "imagebatch-summary"
FAILURES_KEY = "imagebatch-failures"
PROGRESS_STEP = 2.0  # percent
PROGRESS_MIN_SECONDS = 1.0
MAX_FAILURES_LISTED = 500


def _in_flow_run() -> bool:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx is not None and ctx.flow_run is not None


class ProgressArtifact:
    """The run's progress artifact, moved forward in steps without holding up the run.

    `begin` and `image_done` are plain calls from the flow's loop; one background task owns
    every API call (create, then updates with the latest percentage), so a slow API never
    delays a request and updates never pile up.
    """

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.shown = -1.0
        self.shown_at = 0.0
        self.wanted: float | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task | None = None

    def begin(self, total: int) -> None:
        if self._worker is not None or not _in_flow_run():
            return
        self.total = total
        self.wanted = 0.0 if total else 100.0
        self._worker = asyncio.get_running_loop().create_task(self._run())

    def image_done(self) -> None:
        """Count one finished image."""
        if self._worker is None or not self.total:
            return
        self.done += 1
        percent = min(100.0, 100.0 * self.done / self.total)
        now = time.monotonic()
        if percent < 100.0 and (
            percent - self.shown < PROGRESS_STEP or now - self.shown_at < PROGRESS_MIN_SECONDS
        ):
            return
        self.shown, self.shown_at = percent, now
        self.wanted = percent
        self._wake.set()

    async def finish(self) -> None:
        """Show where the run really ended (a stopped run stays below 100%) and wait for it."""
        if self._worker is None:
            return
        self.wanted = round(100.0 * self.done / self.total, 1) if self.total else 100.0
        self._closing = True
        self._wake.set()
        await asyncio.gather(self._worker, return_exceptions=True)

    async def _run(self) -> None:
        from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact

        try:
            sent = self.wanted
            artifact_id = await acreate_progress_artifact(
                sent or 0.0, key=PROGRESS_KEY, description=f"{self.total} image(s)"
            )
            while True:
                if self.wanted == sent:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                sent = self.wanted
                await aupdate_progress_artifact(artifact_id, sent or 0.0)
        except Exception as exc:  # the UI is a view: it must never stop a run
            log.warning("progress artifact not updated: %s", type(exc).__name__)


def summary_rows(
    manifest: Manifest, elapsed: float, stopped: str | None, skipped: int, out_dir: str
) -> list[dict[str, Any]]:
    """The summary table: one row per (model, status), then the run's totals."""
    rows: list[dict[str, Any]] = []
    counts = Counter(
        (str(r.get("model") or "(none)"), str(r["status"]))
        for r in manifest.rows
        if r.get("status") is not None
    )
    for (model, status), n in sorted(counts.items()):
        rows.append({"what": status, "model": _cell(model), "value": n})
    succeeded = len(manifest.with_status("succeeded"))
    ambiguous = sum(_count(v) for v in manifest.column("ambiguous_retries"))
    per_minute = round(succeeded / (elapsed / 60.0), 1) if elapsed > 0 else 0.0
    rows += [
        {"what": "images requested", "model": "all", "value": len(manifest)},
        {"what": "already done before this run", "model": "all", "value": skipped},
        {"what": "elapsed seconds", "model": "all", "value": round(elapsed, 1)},
        {"what": "images per minute", "model": "all", "value": per_minute},
        {"what": "possibly paid twice", "model": "all", "value": ambiguous},
        {"what": "stopped early", "model": "all", "value": _cell(stopped or "no")},
        {"what": "output folder", "model": "all", "value": out_dir},
    ]
    return rows


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>&~])")


def _count(value: Any) -> int:
    """A count cell; a missing or unreadable one counts 0."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def escape_markdown(text: Any, limit: int = 300) -> str:
    """Text from a CSV or a server as literal markdown: no links, no HTML, no table breaks."""
    s = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
    s = " ".join(s.split())  # newlines would end the list item
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return _MD_SPECIAL.sub(r"\\\1", s)


def _cell(text: Any) -> str:
    return " ".join(str(text).split())[:200]


def failures_markdown(manifest: Manifest, stopped: str | None) -> str:
    """Every image that did not succeed, with its reason, as escaped markdown."""
    bad = manifest.with_status("succeeded", keep=False)
    lines = [f"# imagebatch: {len(bad)} of {len(manifest)} image(s) did not succeed", ""]
    if stopped:
        lines += [f"**The run stopped early:** {escape_markdown(stopped)}", ""]
    for rec in bad[:MAX_FAILURES_LISTED]:
        reason = escape_markdown(rec.get("error_message")) or "(no message)"
        job_id = rec.get("job_id")
        job = f", job {escape_markdown(job_id, 80)}" if isinstance(job_id, str) else ""
        lines.append(
            f"- row {escape_markdown(rec.get('row'))}{job}, image "
            f"{escape_markdown(rec.get('image_index'))}: **{escape_markdown(rec.get('status'))}** "
            f"{escape_markdown(rec.get('error_code'), 80)}: {reason}"
        )
    if len(bad) > MAX_FAILURES_LISTED:
        lines.append(f"- … and {len(bad) - MAX_FAILURES_LISTED} more: see the manifest")
    if not len(bad):
        lines.append("Every image succeeded.")
    return "\n".join(lines) + "\n"


async def publish_summary(
    manifest: Manifest, elapsed: float, stopped: str | None, skipped: int, out_dir: str
) -> None:
    """The end-of-run table and failures artifacts; failures to publish are only logged."""
    if not _in_flow_run():
        return
    from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

    try:
        await acreate_table_artifact(
            summary_rows(manifest, elapsed, stopped, skipped, out_dir),
            key=SUMMARY_KEY,
            description=f"imagebatch run into {out_dir}",
        )
        await acreate_markdown_artifact(
            failures_markdown(manifest, stopped),
            key=FAILURES_KEY,
            description="Images that did not succeed, with their reasons",
        )
    except Exception as exc:
        log.warning("could not publish the run's artifacts: %s", type(exc).__name__)
