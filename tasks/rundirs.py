"""Dated run folders under an output root, for scheduled and deployed runs.

A nightly run must never write over last night's images, so each run gets its own folder
named by its start time (UTC, to the millisecond) and a short run id:
`2026-12-01T020000.000Z-3f9a1c2b`. The name sorts by time, so the newest run is the
greatest name; `latest` compares the times only. `latest` (a relative symlink) and
`LATEST` (a text file with the folder's name, for tools and filesystems without symlinks)
name the newest finished run; both are replaced atomically.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

from imagebatch.tasks.errors import OutputError
from imagebatch.tasks.files import write_atomic

LATEST_LINK = "latest"
LATEST_FILE = "LATEST"
_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{6}\.\d{3}Z-[0-9a-z]{8}$")


def dated_folder(root: Path, started: dt.datetime, run_id: str) -> Path:
    """A new folder for one run: created here, refused if it somehow exists already."""
    utc = started.astimezone(dt.UTC)
    stamp = utc.strftime("%Y-%m-%dT%H%M%S") + f".{utc.microsecond // 1000:03d}Z"
    # The tail: Prefect's run ids are time-ordered, so their heads repeat between runs.
    short = re.sub(r"[^0-9a-z]", "", run_id.lower())[-8:].rjust(8, "0")
    path = root / f"{stamp}-{short}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    except FileExistsError:
        raise OutputError(f"run folder {path} already exists; refusing to write over it") from None
    except OSError as exc:
        raise OutputError(f"cannot create the run folder {path}: {exc.strerror or exc}") from None
    return path


def is_run_folder(name: str) -> bool:
    return bool(_NAME.match(name))


def current_latest(root: Path) -> str | None:
    try:
        name = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name if is_run_folder(name) else None


def mark_latest(run_dir: Path) -> bool:
    """Point `latest` at `run_dir` unless a newer run already finished. True if it moved."""
    root, name = run_dir.parent, run_dir.name
    previous = current_latest(root)
    # By start time only: two runs started in the same millisecond both count as newest.
    if previous is not None and previous.rsplit("-", 1)[0] > name.rsplit("-", 1)[0]:
        return False
    write_atomic(root / LATEST_FILE, (name + "\n").encode("utf-8"))
    link = root / LATEST_LINK
    tmp = root / f".{LATEST_LINK}.{os.getpid()}.tmp"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, link)
    except OSError:  # no symlinks here (some network filesystems): LATEST still says it
        try:
            tmp.unlink()
        except OSError:
            pass
    return True
