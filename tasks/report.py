"""Report: what a finished run folder holds, and the outputs made for people and datasets.

`publish` writes thumbs/, index.html, metadata.jsonl (and contact_sheet.png when asked) from
a manifest; the flow calls it at the end of every run and `imagebatch report DIR` calls it
on a finished folder. `summarize` reads a folder (manifest, run.json, journal) and never
writes. Both see only what the manifest says, so they agree with it by construction.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from imagebatch.configs.settings import GallerySettings
from imagebatch.tasks.contact_sheet import write_contact_sheet
from imagebatch.tasks.errors import ImagebatchError, InputError
from imagebatch.tasks.gallery import json_cell, write_page
from imagebatch.tasks.hf_metadata import write_metadata
from imagebatch.tasks.journal import JOURNAL_NAME, Journal
from imagebatch.tasks.manifest import COLUMNS, INT_COLUMNS, SERVER_TEXT, STATUSES
from imagebatch.tasks.outdir import RUN_JSON, read_run_json
from imagebatch.tasks.thumbs import ThumbSpec, sync_thumbnails

log = logging.getLogger("imagebatch")


@dataclass
class RunFolder:
    out_dir: Path
    manifest: pd.DataFrame
    run: dict[str, Any]

    @property
    def extra(self) -> list[str]:
        """The carried-through columns: whatever the manifest has beyond the fixed ones."""
        return [c for c in self.manifest.columns if c not in COLUMNS]


def open_run_folder(path: Path) -> RunFolder:
    """The folder's manifest and run.json; InputError (one line) when it is not a run folder."""
    out_dir = path.expanduser()
    if not out_dir.is_dir():
        raise InputError(f"{path} is not a folder")
    run = read_run_json(out_dir)
    manifest = _read_manifest(out_dir)
    if run is None or manifest is None:
        missing = RUN_JSON if run is None else "manifest.csv or manifest.parquet"
        raise InputError(f"{path} is not an imagebatch run folder (no readable {missing})")
    if "status" not in manifest.columns:
        raise InputError(f"{path}: the manifest has no 'status' column; not an imagebatch manifest")
    return RunFolder(out_dir.resolve(), manifest, run)


def _read_manifest(out_dir: Path) -> pd.DataFrame | None:
    """Parquet keeps the types; CSV is read as text (a prompt "NA" stays "NA")."""
    try:
        return pd.read_parquet(out_dir / "manifest.parquet")
    except (OSError, ValueError, ImportError):
        pass
    try:
        frame = pd.read_csv(
            out_dir / "manifest.csv", dtype=str, keep_default_na=False, na_values=[""]
        )
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    for col in INT_COLUMNS:
        if col in frame.columns:
            frame[col] = pd.array(pd.to_numeric(frame[col], errors="coerce"), dtype="Int64")
    # manifest.csv quotes server text that would start a formula; undo that (a text that
    # really began with an apostrophe and a formula sign reads back without the apostrophe).
    for col in SERVER_TEXT:
        if col in frame.columns:
            frame[col] = frame[col].str.replace(r"^'(?=[=+\-@\t\r])", "", regex=True)
    return frame


def summary_line(manifest: pd.DataFrame, run: dict[str, Any]) -> str:
    """One line for the page's header: counts, when, where the images came from."""
    counts = manifest["status"].value_counts()
    parts = [f"{counts.get(s, 0)} {s}" for s in STATUSES if counts.get(s, 0)]
    text = f"{len(manifest)} requested images: " + ", ".join(parts or ["none"])
    if run.get("finished_at"):
        text += f" · finished {str(run['finished_at'])[:19].replace('T', ' ')} UTC"
    if run.get("simulator"):
        text += " · synthetic images from the built-in simulator"
    if run.get("stopped"):
        text += f" · the run stopped early: {run['stopped']}"
    return text


def publish(
    out_dir: Path, manifest: pd.DataFrame, run: dict[str, Any], settings: GallerySettings
) -> list[Path]:
    """Thumbnails, index.html and metadata.jsonl (and the contact sheet); the paths written."""
    extra = [c for c in manifest.columns if c not in COLUMNS]
    done = manifest[manifest["status"] == "succeeded"]
    images = [
        (str(f), json_cell(sha))
        for f, sha in zip(done["file"], done.get("sha256", [None] * len(done)))
        if isinstance(f, str)
    ]
    spec = ThumbSpec(size=settings.thumb_size, format=settings.thumb_format)
    thumbs = sync_thumbnails(out_dir, images, spec)
    written = [
        write_page(out_dir, manifest, extra, thumbs, summary_line(manifest, run)),
        write_metadata(out_dir, manifest, extra),
    ]
    if settings.contact_sheet > 0:
        cells = [
            (thumbs[f], f"{json_cell(job)} #{json_cell(index)}")
            for f, job, index in zip(done["file"], done["job_id"], done["image_index"])
            if f in thumbs
        ][: settings.contact_sheet]
        sheet = write_contact_sheet(out_dir, cells, cell=settings.thumb_size)
        if sheet is not None:
            written.append(sheet)
    return written


@dataclass
class Summary:
    out_dir: Path
    total: int
    counts: dict[str, int]
    by_model: pd.DataFrame  # rows: model, columns: statuses present
    failures: list[tuple[str, str, int, str]]  # (status, code, images, an example message)
    seconds: float | None
    dispatch_seconds: float | None
    made_last_run: int | None  # images the last run made (journal), None if unknown
    finished_at: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_minute(self) -> float | None:
        """Images the last run made per minute of sending requests."""
        span = self.dispatch_seconds or self.seconds
        if not span or self.made_last_run is None:
            return None
        return self.made_last_run * 60.0 / span


def summarize(folder: RunFolder) -> Summary:
    """Counts by status and model, failures grouped by reason, and the last run's pace."""
    m, run = folder.manifest, folder.run
    counts = {s: int((m["status"] == s).sum()) for s in STATUSES}
    model = m["model"].fillna("(none)") if "model" in m.columns else pd.Series("(none)", m.index)
    by_model = pd.crosstab(model.rename("model"), m["status"])
    by_model = by_model[[s for s in STATUSES if s in by_model.columns]]
    bad = m[m["status"] != "succeeded"]
    failures = []
    if len(bad):
        code = bad.get("error_code", pd.Series(None, bad.index)).fillna("")
        message = bad.get("error_message", pd.Series(None, bad.index)).fillna("")
        grouped = pd.DataFrame({"status": bad["status"], "code": code, "message": message})
        for (status, err), group in grouped.groupby(["status", "code"], sort=False):
            example = next((x for x in group["message"] if x), "")
            failures.append((str(status), str(err), len(group), str(example)))
        failures.sort(key=lambda f: -f[2])
    notes = []
    if run.get("in_progress"):
        notes.append("the last run did not finish (killed?): the manifest is from the run before")
    if run.get("stopped"):
        notes.append(f"the last run stopped early: {run['stopped']}")
    if run.get("simulator"):
        notes.append("these images came from the built-in simulator, not from OpenAI")
    return Summary(
        folder.out_dir,
        len(m),
        counts,
        by_model,
        failures,
        _number(run.get("seconds")),
        _number(run.get("dispatch_seconds")),
        _made_last_run(folder),
        run.get("finished_at"),
        notes,
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _made_last_run(folder: RunFolder) -> int | None:
    """Images the journal says the last run (run.json's run_id) made."""
    run_id = folder.run.get("run_id")
    if not run_id or not (folder.out_dir / JOURNAL_NAME).is_file():
        return None
    try:
        records = Journal(folder.out_dir).load()
    except OSError:
        return None
    return sum(1 for r in records.values() if r.run_id == run_id and r.status == "succeeded")


def format_seconds(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds))) if seconds >= 60 else f"{seconds:.1f} s"


def publish_after_run(
    out_dir: Path, manifest: pd.DataFrame, run: dict[str, Any], settings: GallerySettings
) -> str | None:
    """`publish` for the end of a run: a failure here is reported, never fatal, because the
    images, journal and manifest are already safe. Returns a notice, or None."""
    if not settings.enabled:
        return None
    try:
        publish(out_dir, manifest, run, settings)
    except Exception as exc:  # even a bug here must not turn a finished run into a crash
        log.debug("gallery not written", exc_info=True)
        reason = str(exc) if isinstance(exc, OSError | ImagebatchError) else repr(exc)
        return (
            f"the gallery (index.html, thumbs/, metadata.jsonl) was not written: {reason}; "
            "`imagebatch report` can make it later"
        )
    return None
