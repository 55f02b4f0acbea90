"""imagebatch: bulk image jobs against the OpenAI Images API and compatible servers."""

from imagebatch.api import run, run_report, validate

__all__ = ["run", "run_report", "validate"]
