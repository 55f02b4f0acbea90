"""imagebatch: bulk image jobs against the OpenAI Images API and compatible servers."""

from imagebatch.api import estimate, run, run_report, validate

__all__ = ["estimate", "run", "run_report", "validate"]
