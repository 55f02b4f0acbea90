"""The exception hierarchy; each class maps to one thing the pipeline does about it.

The tree, with what each class means, is in docs/design.md ("Errors"). ImagebatchError and
ConfigError live in configs/errors.py so configs never imports the stages.
"""

from __future__ import annotations

from collections.abc import Mapping

from imagebatch.configs.errors import ConfigError, ImagebatchError

__all__ = [
    "AmbiguousError",
    "ApiError",
    "ConfigError",
    "FatalError",
    "ImagebatchError",
    "InputError",
    "ModelUnavailable",
    "OutputError",
    "RateLimited",
    "RejectedError",
    "RequestError",
    "RunLocked",
    "SettingsChanged",
    "TransientError",
]


class InputError(ImagebatchError):
    pass


class OutputError(ImagebatchError):
    pass


class RunLocked(OutputError):
    pass


class SettingsChanged(OutputError):
    pass


class ApiError(ImagebatchError):
    """An Images API call failed. Carries what the server said, never the request headers."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = type
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after
        self.should_retry = should_retry
        # Response headers (rate-limit hints); set by the client, never request headers.
        self.headers: Mapping[str, str] | None = None

    @property
    def error_code(self) -> str:
        """The short code recorded in the manifest's `error_code` column."""
        if self.code:
            return self.code
        if self.type:
            return self.type
        if self.status:
            return f"http_{self.status}"
        return type(self).__name__

    def __str__(self) -> str:
        prefix = f"{self.status} " if self.status else ""
        return f"{prefix}{self.error_code}: {self.message}"


class TransientError(ApiError):
    pass


class RateLimited(TransientError):
    pass


class AmbiguousError(TransientError):
    """The request left this machine and no answer came back: it may have been billed."""


class RejectedError(ApiError):
    pass


class RequestError(ApiError):
    pass


class ModelUnavailable(RequestError):
    """The server does not serve this model (or deployment): no image of it can succeed."""


class FatalError(ApiError):
    pass
