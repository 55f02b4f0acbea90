"""Which Prefect API a CLI or notebook run talks to, said in one line.

1. The server Prefect is configured for (PREFECT_API_URL, from the environment or a profile).
2. Else a server started with `prefect server start --background`: Prefect records its
   process id in $PREFECT_HOME/server.pid (and nothing else), so its address is read from
   that process's command line where the system shows it (Linux /proc), else taken from
   Prefect's server settings (127.0.0.1:4200 by default); it is used only if it answers
   GET /api/health at once.
3. Else Prefect's API served from this process (flows/prefect_inprocess.py): a thread runs
   Prefect's API app under uvicorn on a loopback port, once per process (a notebook kernel
   starts it once), with the database Prefect's ephemeral mode would use, and stops it at
   exit after its services have recorded what the run sent. This replaces Prefect's own
   ephemeral server, a uvicorn subprocess of about 200 MB.
4. Else, when that cannot start (import error, bind error, not healthy in time), Prefect's
   own ephemeral API: a temporary server subprocess per process, said in the same line.
   The hint to start a background server is given once per process.

Deployed and scheduled runs do not come here: their worker's settings decide.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagebatch.tasks.redact import mask_url

# A server on loopback answers its health check in milliseconds; a dead or foreign port must
# not hold the run up.
HEALTH_TIMEOUT_SECONDS = 1.0
BACKGROUND_COMMAND = "prefect server start --background"
PID_FILE = "server.pid"  # prefect.cli._server_utils.SERVER_PID_FILE_NAME, a private name

_hinted = threading.Event()


@dataclass(frozen=True)
class PrefectApi:
    """The API chosen: `url` is None for Prefect's own ephemeral API; `why` says why the
    in-process API could not be used there."""

    url: str | None
    source: str  # "configured", "background", "in-process" or "ephemeral"
    why: str = ""

    def message(self) -> str | None:
        """The line to show the user, or None (the no-server hint is given once per process)."""
        if self.source in ("configured", "background"):
            how = f" (started by `{BACKGROUND_COMMAND}`)" if self.source == "background" else ""
            return f"using the Prefect server at {mask_url(self.url or '')}{how}"
        if _hinted.is_set():
            return None
        _hinted.set()
        hint = f"`{BACKGROUND_COMMAND}` makes later runs start in about 2 s"
        if self.source == "in-process":
            return (
                "no Prefect server found: serving Prefect's API from this process (once per "
                f"process, runs kept in Prefect's database); {hint} and shows them in its UI"
            )
        return (
            f"could not serve Prefect's API from this process ({self.why}): using Prefect's "
            f"temporary API server (seconds to start, once per process); {hint}"
        )


class Announcing:
    """The caller's reporter, which first says which Prefect API the run uses: at the run's
    first word to the user, so a run refused before it (its output folder, its settings)
    shows only its one-line error."""

    def __init__(self, inner: Any, api: PrefectApi) -> None:
        self.inner = inner
        self.api = api
        self._said = False

    def _say(self) -> None:
        if not self._said:
            self._said = True
            message = self.api.message()
            if message is not None:
                self.inner.notice(message)

    def notice(self, message: str) -> None:
        self._say()
        self.inner.notice(message)

    def problems(self, problems: list[Any]) -> None:
        if problems:  # no problems: nothing is shown
            self._say()
        self.inner.problems(problems)

    def start(self, total: int, skipped: int) -> None:
        self._say()
        self.inner.start(total, skipped)

    def image(self, record: Any) -> None:
        self.inner.image(record)

    def finish(self) -> None:
        self.inner.finish()


def choose() -> PrefectApi:
    """The API the next run should use (see the module docstring for the order)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return PrefectApi(str(settings.api.url), "configured")
    server = settings.server.api
    url = background_server(Path(settings.home), server.host, server.port)
    if url is not None:
        return PrefectApi(url, "background")
    from imagebatch.flows import prefect_inprocess

    try:
        return PrefectApi(prefect_inprocess.serve(), "in-process")
    except prefect_inprocess.NotServed as exc:
        return PrefectApi(None, "ephemeral", str(exc))


@contextlib.contextmanager
def use(api: PrefectApi) -> Iterator[None]:
    """Point Prefect at a background or in-process server for the duration of a run (in this
    context); a configured server is already Prefect's setting."""
    if api.source not in ("background", "in-process"):
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api.url}):
        yield


def background_server(home: Path, host: str, port: int) -> str | None:
    """The API URL of a healthy server that `prefect server start --background` started with
    this PREFECT_HOME, or None."""
    try:
        pid = int((home / PID_FILE).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)  # a stale file from a server that is gone
    except PermissionError:
        pass  # alive, run by another user: the health check below decides
    except OSError:
        return None
    host, port = _listening(pid, host, port)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{port}/api"
    return url if _healthy(url) else None


def _listening(pid: int, host: str, port: int) -> tuple[str, int]:
    """--host and --port of the server's command line (uvicorn's), where the system shows it."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return host, port
    for flag, value in zip(args, args[1:]):
        if flag == "--host":
            host = value
        elif flag == "--port" and value.isdigit():
            port = int(value)
    return host, port


def _healthy(url: str) -> bool:
    import httpx

    try:
        # A local server: never through an HTTP proxy from the environment.
        reply = httpx.get(f"{url}/health", timeout=HEALTH_TIMEOUT_SECONDS, trust_env=False)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200
