"""imagebatch: bulk image jobs against the OpenAI Images API and compatible servers."""

from imagebatch.api import run, validate

__all__ = ["run", "validate"]
