"""Error answers in the OpenAI API's shape, and the simulator's canned ones."""

from __future__ import annotations

import json
import math
from typing import Any

from imagebatch.configs.registry import ModelSpec

from .limits import Rejection, go_duration


class ApiFailure(Exception):
    """An error answer in the API's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
                **self.extra,
            }
        }


def bad(param: str | None, message: str, code: str | None = "invalid_value") -> ApiFailure:
    return ApiFailure(400, message, "invalid_request_error", param, code)


def unknown_param(param: str, model: str) -> ApiFailure:
    return bad(
        param,
        f"Unknown parameter: '{param}'. (Not accepted by model '{model}'.)",
        "unknown_parameter",
    )


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a decimal",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def quota_failure(kind: str = "insufficient_quota") -> ApiFailure:
    if kind == "billing_hard_limit_reached":
        return ApiFailure(
            400,
            "Billing hard limit has been reached",
            "invalid_request_error",
            None,
            "billing_hard_limit_reached",
        )
    return ApiFailure(
        429,
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        None,
        "insufficient_quota",
    )


def rate_limit_failure(
    model: str, org: str, rej: Rejection, omit_retry_after: bool = False
) -> ApiFailure:
    """A 429 in OpenAI's words; `omit_retry_after` leaves the headers out (the message's
    "try again in" remains)."""
    label = "requests per min (RPM)" if rej.bucket == "requests" else "images per min (IPM)"
    if rej.window != 60.0:  # a test's short window: the message must not claim a minute
        label = f"{rej.bucket} per {rej.window:g} s"
    if rej.wait is None:
        return ApiFailure(
            429,
            f"Request too large for {model} in organization {org} on {label}: Limit {rej.limit}, "
            f"Requested {rej.requested}. Reduce n to run successfully.",
            rej.bucket,
            None,
            "rate_limit_exceeded",
            headers={"x-should-retry": "false"},
        )
    wait_ms = max(1, math.ceil(rej.wait * 1000))
    return ApiFailure(
        429,
        f"Rate limit reached for {model} in organization {org} on {label}: Limit {rej.limit}, "
        f"Used {rej.used}, Requested {rej.requested}. Please try again in {go_duration(wait_ms / 1000)}. "
        "Visit https://platform.openai.com/account/rate-limits to learn more.",
        rej.bucket,
        None,
        "rate_limit_exceeded",
        headers={}
        if omit_retry_after
        else {
            "retry-after": str(max(1, math.ceil(wait_ms / 1000))),
            "retry-after-ms": str(wait_ms),
        },
    )


def restyle(failure: ApiFailure, style: str, echo: Any = None) -> tuple[int, dict[str, Any]]:
    """The status and body `failure` has when a proxy or another server sends it.

    litellm: the original code becomes the status as a string and the message gets the
    proxy's prefix. fastapi: a 400 about a parameter is a 422 validation error that echoes
    the request back in `input`.
    """
    body = failure.body()
    if style == "litellm":
        kind = LITELLM_KINDS.get(failure.status, "APIError")
        message = f"litellm.{kind}: OpenAIException - {body['error']['message']}"
        err = {"message": message, "type": None, "param": None, "code": str(failure.status)}
        return failure.status, {"error": err}
    if style == "fastapi" and failure.status == 400:
        param = body["error"].get("param") or "body"
        item = {
            "type": body["error"].get("code") or "value_error",
            "loc": ["body", param],
            "msg": body["error"]["message"],
            "input": echo,
        }
        return 422, {"detail": [item]}
    return failure.status, body


LITELLM_KINDS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    429: "RateLimitError",
}


def moderation_failure(spec: ModelSpec) -> ApiFailure:
    if spec.is_gpt_image:
        return ApiFailure(
            400,
            "Your request was rejected by the safety system. If you believe this is an error, contact us at "
            "help.openai.com and include the request ID.",
            "image_generation_user_error",
            None,
            "moderation_blocked",
            extra={
                "moderation_details": {"moderation_stage": "input", "categories": ["simulated"]}
            },
        )
    return ApiFailure(
        400,
        "Your request was rejected as a result of our safety system. Your prompt may contain text that is "
        "not allowed by our safety system.",
        "invalid_request_error",
        None,
        "content_policy_violation",
    )
