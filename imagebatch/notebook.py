"""Progress where notebooks run: an HTML bar updated in place in a Jupyter/VS Code kernel, a
text bar on a terminal, nothing in a script whose output is a file.

The kernel bar is one `display(..., display_id=True)` updated with `update_display`: it needs
no ipywidgets (often missing or not enabled in VS Code and JupyterLab), is stored in the
notebook as plain HTML, and works from the worker thread the run uses inside a kernel.
"""

from __future__ import annotations

import html
import sys
import threading
import time
from typing import Any

# Redraw at most this often; a 10,000-image run must not flood the notebook with updates.
MIN_REDRAW_SECONDS = 0.25


def in_kernel() -> bool:
    """True inside a Jupyter kernel (Jupyter, JupyterLab, VS Code, nbclient), not a terminal."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def make_reporter(progress: bool | None) -> Any:
    """The reporter for a Python API run. `progress=None`: a bar only where someone watches."""
    if progress is False:
        return None
    if in_kernel():
        return HtmlReporter()
    if progress or sys.stderr.isatty():
        return TextReporter()
    return None


class _Counts:
    """Counts by status and the throttle shared by both bars."""

    def __init__(self) -> None:
        self.total = 0
        self.skipped = 0
        self.done = 0
        self.by_status: dict[str, int] = {}
        self.started = time.monotonic()
        self._drawn = 0.0
        self.lock = threading.Lock()

    def add(self, status: str) -> bool:
        """Count one image; True when it is time to redraw."""
        with self.lock:
            self.done += 1
            self.by_status[status] = self.by_status.get(status, 0) + 1
            now = time.monotonic()
            if now - self._drawn < MIN_REDRAW_SECONDS and self.done < self.total:
                return False
            self._drawn = now
            return True

    def line(self) -> str:
        parts = [f"{self.done}/{self.total} images"]
        parts += [f"{k} {v}" for k, v in sorted(self.by_status.items())]
        parts.append(f"{time.monotonic() - self.started:.0f}s")
        if self.skipped:
            parts.append(f"{self.skipped} already done")
        return " · ".join(parts)


class HtmlReporter:
    """An HTML progress bar in the cell's output, plus notices and problems as escaped text."""

    def __init__(self) -> None:
        from IPython.display import HTML, display

        self._HTML = HTML
        self._display = display
        self.counts = _Counts()
        self.handle: Any = None

    def _html(self) -> Any:
        c = self.counts
        value = c.done if c.total else 1
        return self._HTML(
            f'<div class="imagebatch-progress"><progress value="{value}" max="{max(c.total, 1)}"'
            f' style="width:40em"></progress> <span>{html.escape(c.line())}</span></div>'
        )

    def notice(self, message: str) -> None:
        self._display(self._HTML(f"<pre>{html.escape(message)}</pre>"))

    def problems(self, problems: list[Any]) -> None:
        if not problems:
            return
        shown = "\n".join(f"{p.severity}: {p}" for p in problems[:20])
        more = f"\n… and {len(problems) - 20} more" if len(problems) > 20 else ""
        self._display(self._HTML(f"<pre>{html.escape(shown + more)}</pre>"))

    def start(self, total: int, skipped: int) -> None:
        self.counts = _Counts()
        self.counts.total = total
        self.counts.skipped = skipped
        self.handle = self._display(self._html(), display_id=True)

    def image(self, record: Any) -> None:
        if self.handle is not None and self.counts.add(record.status):
            self.handle.update(self._html())

    def finish(self) -> None:
        if self.handle is not None:
            self.handle.update(self._html())
            self.handle = None


class TextReporter:
    """One line on stderr rewritten in place (IPython in a terminal, a script on a terminal)."""

    def __init__(self) -> None:
        self.counts = _Counts()
        self.active = False

    def notice(self, message: str) -> None:
        self._clear()
        print(message, file=sys.stderr)

    def problems(self, problems: list[Any]) -> None:
        for p in problems[:20]:
            self.notice(f"{p.severity}: {p}")
        if len(problems) > 20:
            self.notice(f"… and {len(problems) - 20} more")

    def start(self, total: int, skipped: int) -> None:
        self.counts = _Counts()
        self.counts.total = total
        self.counts.skipped = skipped
        self.active = total > 0

    def image(self, record: Any) -> None:
        if self.active and self.counts.add(record.status):
            sys.stderr.write("\r" + self.counts.line())
            sys.stderr.flush()

    def _clear(self) -> None:
        if self.active and self.counts.done:
            sys.stderr.write("\r\033[K")

    def finish(self) -> None:
        if self.active:
            sys.stderr.write("\r" + self.counts.line() + "\n")
            sys.stderr.flush()
            self.active = False
