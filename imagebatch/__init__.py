"""imagebatch: bulk image jobs against the OpenAI Images API and compatible servers."""

from imagebatch.api import arun, estimate, run, run_report, validate
from imagebatch.remote import submit, wait

__all__ = ["arun", "estimate", "run", "run_report", "submit", "validate", "wait"]
