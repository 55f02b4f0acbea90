"""Report: what a finished run folder holds, and the outputs made for people and datasets.

`publish` writes thumbs/, index.html, metadata.jsonl (and contact_sheet.png when asked) from
a manifest; the flow calls it at the end of every run and `imagebatch report DIR` calls it
on a finished folder. `summarize` reads a folder (manifest, run.json, journal) and never
writes. Both see only what the manifest says, so they agree with it by construction.
Manifests are plain rows here: manifest.parquet is read with pyarrow, manifest.csv with
the csv module; neither needs pandas.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagebatch.configs.settings import GallerySettings
from imagebatch.tasks.contact_sheet import write_contact_sheet
from imagebatch.tasks.errors import ImagebatchError, InputError
from imagebatch.tasks.gallery import json_cell, write_page
from imagebatch.tasks.hf_metadata import write_metadata
from imagebatch.tasks.journal import JOURNAL_NAME, Journal
from imagebatch.tasks.manifest import INT_COLUMNS, SERVER_TEXT, STATUSES, Manifest
from imagebatch.tasks.outdir import RUN_JSON, read_run_json
from imagebatch.tasks.thumbs import ThumbSpec, sync_thumbnails

log = logging.getLogger("imagebatch")


@dataclass
class RunFolder:
    out_dir: Path
    manifest: Manifest
    run: dict[str, Any]

    @property
    def extra(self) -> list[str]:
        """The carried-through columns: whatever the manifest has beyond the fixed ones."""
        return self.manifest.extra


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


def _read_manifest(out_dir: Path) -> Manifest | None:
    """Parquet keeps the types; CSV is read as text (a prompt "NA" stays "NA")."""
    path = out_dir / "manifest.parquet"
    if path.is_file():
        try:
            import pyarrow.parquet as pq

            # ParquetFile, not pq.read_table: that one imports pandas
            with pq.ParquetFile(path) as f:
                table = f.read()
            return Manifest(list(table.column_names), table.to_pylist())
        except (OSError, ValueError, ImportError):
            pass
    try:
        return _read_csv_manifest(out_dir / "manifest.csv")
    except (OSError, ValueError, UnicodeDecodeError, csv.Error):
        return None


_QUOTED_FORMULA = re.compile(r"^'(?=[=+\-@\t\r])")


def _read_csv_manifest(path: Path) -> Manifest | None:
    """manifest.csv as rows of text, empty cells missing, the counted columns integers."""
    with path.open(encoding="utf-8", newline="") as f:
        records = list(csv.reader(f, strict=True))
    if not records:
        return None
    columns, rows = records[0], []
    for record in records[1:]:
        row: dict[str, Any] = {c: (v if v != "" else None) for c, v in zip(columns, record)}
        for col in INT_COLUMNS:
            if col in row:
                row[col] = _int(row[col])
        # manifest.csv quotes server text that would start a formula; undo that (a text that
        # really began with an apostrophe and a formula sign reads back without the apostrophe).
        for col in SERVER_TEXT:
            if isinstance(row.get(col), str):
                row[col] = _QUOTED_FORMULA.sub("", row[col])
        rows.append(row)
    return Manifest(columns, rows)


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None


def summary_line(manifest: Manifest, run: dict[str, Any]) -> str:
    """One line for the page's header: counts, when, where the images came from."""
    counts = Counter(manifest.column("status"))
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
    out_dir: Path, manifest: Manifest, run: dict[str, Any], settings: GallerySettings
) -> list[Path]:
    """Thumbnails, index.html and metadata.jsonl (and the contact sheet); the paths written."""
    extra = manifest.extra
    done = manifest.with_status("succeeded")
    images = [
        (r["file"], json_cell(r.get("sha256"))) for r in done if isinstance(r.get("file"), str)
    ]
    spec = ThumbSpec(size=settings.thumb_size, format=settings.thumb_format)
    thumbs = sync_thumbnails(out_dir, images, spec)
    written = [
        write_page(out_dir, manifest, extra, thumbs, summary_line(manifest, run)),
        write_metadata(out_dir, manifest, extra),
    ]
    if settings.contact_sheet > 0:
        cells = [
            (thumbs[r["file"]], f"{json_cell(r.get('job_id'))} #{json_cell(r.get('image_index'))}")
            for r in done
            if r.get("file") in thumbs
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
    by_model: dict[str, dict[str, int]]  # model -> images by status (every status shown)
    statuses: list[str]  # the statuses present, in STATUSES order
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
    statuses = m.column("status")
    counts = {s: statuses.count(s) for s in STATUSES}
    present = [s for s in STATUSES if counts[s]]
    by_model: dict[str, dict[str, int]] = {}
    for row in m.rows:
        if row.get("status") in present:
            model = str(row.get("model") or "(none)")
            cell = by_model.setdefault(model, dict.fromkeys(present, 0))
            cell[row["status"]] += 1
    by_model = dict(sorted(by_model.items()))
    groups: dict[tuple[str, str], list[str]] = {}
    for row in m.with_status("succeeded", keep=False):
        key = (str(row.get("status")), str(row.get("error_code") or ""))
        groups.setdefault(key, []).append(str(row.get("error_message") or ""))
    failures = [
        (status, code, len(messages), next((x for x in messages if x), ""))
        for (status, code), messages in groups.items()
    ]
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
        present,
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
    out_dir: Path, manifest: Manifest, run: dict[str, Any], settings: GallerySettings
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
