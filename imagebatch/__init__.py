"""imagebatch: bulk image jobs against the OpenAI Images API and compatible servers.

The Python API (`imagebatch.run`, ...) is imported on first use, not here: every
`imagebatch` command imports this package first, and `--help`, `models` or `validate`
must not pay for pandas and Prefect (see README, "Start-up").
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imagebatch.api import arun, estimate, run, run_report, validate
    from imagebatch.remote import submit, wait

_HOMES = {
    "arun": "imagebatch.api",
    "estimate": "imagebatch.api",
    "run": "imagebatch.api",
    "run_report": "imagebatch.api",
    "validate": "imagebatch.api",
    "submit": "imagebatch.remote",
    "wait": "imagebatch.remote",
}

__all__ = ["arun", "estimate", "run", "run_report", "submit", "validate", "wait"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'imagebatch' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
