"""The exception hierarchy. Each class maps to one thing the pipeline does about it.

ImagebatchError        (with ConfigError, in configs/errors.py: configs never imports the stages)
├── ConfigError        bad settings, flags or registry: usage error, exit 2
├── InputError         the jobs file cannot be read at all: exit 2
├── OutputError        the output folder cannot hold the run (disk full, unwritable)
│   ├── RunLocked      another run holds the folder
│   └── SettingsChanged  the folder was made with settings that shape output differently
└── ApiError           a request did not produce images
    ├── TransientError   retry with backoff (408, 409, 5xx, transport, malformed body)
    │   ├── RateLimited  429 rate_limit_exceeded: pause the whole run
    │   └── AmbiguousError  sent, then lost: the server may have billed it
    ├── RejectedError    moderation / content policy: never retried, status `rejected`
    ├── RequestError     other 4xx: never retried, status `failed`
    │   └── ModelUnavailable  404 model_not_found: that model's remaining images fail, others run
    └── FatalError       401, 403, other 404, insufficient_quota, billing_hard_limit_reached: stop the run
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
