"""Helpers more than one test module uses (imported as `from helpers import ...`, as
`browser.py` is; fixtures live in conftest.py)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from imagebatch.tasks.journal import Journal
from imagebatch.tasks.store import ImageStore


def free_port() -> int:
    """A loopback port free now, for a server that cannot take a bound socket or report the
    port it chose (Prefect's); another process could take it first, so use it at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jobs(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def wait_for(
    pred: Callable[[], Any],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    every: float = 0.02,
) -> Any:
    """Poll `pred` until it returns something truthy and return that. The timeout is a safety
    net against a hang, not a timing assertion; a watched `proc` that exits first fails at
    once, with the tail of its `log`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise AssertionError(
                f"process exited ({proc.returncode}) while waiting for {what}:\n{tail}"
            )
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def healthy(api_url: str) -> bool:
    """True when the Prefect API at `api_url` answers its health check."""
    try:
        return httpx.get(f"{api_url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def open_store(out: Path) -> tuple[ImageStore, Journal]:
    """A new output folder's image store and open journal, as a run prepares them (for tests
    that drive a stage such as the batch collector directly)."""
    out.mkdir()
    store = ImageStore(out)
    store.prepare()
    journal = Journal(out, sync_first=(store.images_dir,))
    journal.open()
    return store, journal


async def no_download(url: str) -> bytes:
    """A batch collector's `download` for output files with no `url` results."""
    raise AssertionError(f"no url results expected, got {url}")


def kill_at_commit(when: str = "before") -> str:
    """Python source of `imagebatch` that SIGKILLs itself at its KILL_AT-th rename of an image
    into images/ (ImageStore.commit): just before it (`when` "before": journaled, not yet
    renamed) or just after it. A real SIGKILL at a known point, not a simulated one.
    Commits run in the store's thread pool; the probe takes them one at a time, so "after
    the KILL_AT-th rename" means the ones before it are done too."""
    return f"""
import os, signal, sys, threading
import imagebatch.tasks.store as store
renames = 0
one_at_a_time = threading.Lock()
real = store.ImageStore.commit
def commit(self, stored):
    global renames
    with one_at_a_time:
        renames += 1
        at = renames == int(os.environ["KILL_AT"])
        if at and {when == "before"}:
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, stored)
        if at:
            os.kill(os.getpid(), signal.SIGKILL)
store.ImageStore.commit = commit
from imagebatch.cli import main
sys.exit(main())
"""
