"""The output folder: its lock, its run.json, and the settings that shaped its images."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from imagebatch.tasks.errors import OutputError, RunLocked, SettingsChanged
from imagebatch.tasks.files import write_atomic

LOCK_NAME = ".imagebatch.lock"
RUN_JSON = "run.json"


class FolderLock:
    """An exclusive flock on the folder. The kernel drops it when the holder dies, so a lock
    left by a killed run never blocks the next one; the pid inside is only for the message.
    Taken once per run: by run_jobs before Prefect starts, or by the flow when deployed."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            # Never follow a link: the lock file is truncated and written.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is in use by another imagebatch run ({holder}); wait for it or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_run_json(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / RUN_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return None


def write_run_json(out_dir: Path, data: dict[str, Any]) -> None:
    write_atomic(
        out_dir / RUN_JSON,
        json.dumps(data, indent=2, ensure_ascii=False, default=str).encode("utf-8"),
    )


def check_shaping(previous: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to run into a folder whose finished images were made with other output-shaping settings."""
    if not previous or "shaping" not in previous:
        return
    before = previous["shaping"]
    changed = {k: (before.get(k), v) for k, v in current.items() if before.get(k) != v}
    if changed:
        what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise SettingsChanged(
            f"this folder's images were made with other settings ({what}); rows that use these defaults "
            "would be redone and their files replaced. Pass --allow-changed-settings to do that, or use another --out"
        )
