"""What an error answer means, whoever sent it: OpenAI, Azure, a proxy, another server."""

from __future__ import annotations

import json
import time

import pytest

from imagebatch.tasks.errors import (
    FatalError,
    ModelUnavailable,
    RateLimited,
    RejectedError,
    RequestError,
    TransientError,
)
from imagebatch.tasks.headers import parse_reset
from imagebatch.tasks.retry import error_from_response

SAFETY = (
    "Your request was rejected by the safety system. If you believe this is an error, contact us."
)


def body(code=None, etype=None, message="m", **extra) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": etype, "param": None, "code": code, **extra}}
    ).encode()


@pytest.mark.parametrize(
    "status, payload, cls",
    [
        # a proxy (LiteLLM) rewrote the code: the safety-system message still says what it was
        (
            400,
            body("400", None, f"litellm.BadRequestError: OpenAIException - {SAFETY}"),
            RejectedError,
        ),
        (400, body(None, "invalid_request_error", SAFETY), RejectedError),
        (
            400,
            body("400", message="Error code: 400 - {'error': {'code': 'moderation_blocked'}}"),
            RejectedError,
        ),
        (
            400,
            body(
                "content_filter",
                message="The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
            ),
            RejectedError,
        ),
        # a specific code that is not a refusal is believed over words in the message
        (400, body("invalid_value", message="size breaks the content policy"), RequestError),
        # billing and quota stop the run whatever the status
        (400, body("billing_hard_limit_reached", "invalid_request_error"), FatalError),
        (429, body("insufficient_quota", "insufficient_quota"), FatalError),
        (403, body(None, "insufficient_quota"), FatalError),
        # model not served: only that model's rows fail
        (404, body("model_not_found", "invalid_request_error"), ModelUnavailable),
        (
            404,
            body(
                "DeploymentNotFound", message="The API deployment for this resource does not exist."
            ),
            ModelUnavailable,
        ),
        (400, body("model_not_found"), ModelUnavailable),
        (404, body("404", message="The model `acme-9` does not exist"), ModelUnavailable),
        (404, b'{"detail": "Model acme-9 not found"}', ModelUnavailable),
        (404, b"Not Found", FatalError),  # a wrong base URL: every request would hit it
        # 429 kinds
        (
            429,
            body(
                "rate_limit_exceeded",
                "images",
                "Request too large for gpt-image-2 on images per min (IPM): Limit 5, Requested 8.",
            ),
            RequestError,
        ),
        (429, body("rate_limit_exceeded", "requests", "Rate limit reached"), RateLimited),
        (429, body(None, "tokens", "slow"), RateLimited),
        (429, body("429", message="Too Many Requests"), RateLimited),
        (429, b"", RateLimited),
        (429, b"<html><body>429 Too Many Requests</body></html>", RateLimited),
        (
            429,
            body("engine_overloaded", "server_error", "The engine is currently overloaded"),
            TransientError,
        ),
    ],
)
def test_classification_across_servers(status, payload, cls):
    assert type(error_from_response(status, {}, payload)) is cls


def test_fastapi_validation_body_is_one_readable_line_without_the_prompt():
    prompt = "a very long secret product description " * 40
    payload = json.dumps(
        {
            "detail": [
                {
                    "type": "int_parsing",
                    "loc": ["body", "n"],
                    "msg": "Input should be a valid integer",
                    "input": "two",
                },
                {
                    "type": "string_too_long",
                    "loc": ["body", "prompt"],
                    "msg": "String should have at most 1000 characters",
                    "input": prompt,
                },
            ]
        }
    ).encode()
    err = error_from_response(422, {}, payload)
    assert type(err) is RequestError
    assert err.message == (
        "body.n: Input should be a valid integer; body.prompt: String should have at most 1000 characters"
    )
    assert "\n" not in err.message and "secret product" not in err.message


def test_other_shapes_are_summarised():
    many = {"detail": [{"loc": ["body", f"f{i}"], "msg": "bad"} for i in range(5)]}
    msg = error_from_response(422, {}, json.dumps(many).encode()).message
    assert msg == "body.f0: bad; body.f1: bad; body.f2: bad (+2 more)"
    assert (
        error_from_response(400, {}, b'{"message": "quota for model x"}').message
        == "quota for model x"
    )
    assert (
        error_from_response(400, {}, b'{"title": "Bad", "detail": "size too big"}').message
        == "size too big"
    )
    html = (
        b"<html><head><title>502</title></head><body><h1>Bad Gateway</h1>"
        + b"x" * 2000
        + b"</body></html>"
    )
    msg = error_from_response(502, {}, html).message
    assert msg.startswith("502 Bad Gateway") and len(msg) <= 300 and "<" not in msg
    odd = json.dumps({"status": "error", "input": "the prompt " * 100}).encode()
    msg = error_from_response(400, {}, odd).message
    assert msg == '{"status": "error"}'


def test_reset_header_as_duration_or_absolute_unix_time():
    now = 1_800_000_000.0
    assert parse_reset("6m0s", now) == 360.0
    assert parse_reset("1.5", now) == 1.5
    assert parse_reset("1800000030", now) == 30.0
    assert parse_reset("1800000030500", now) == 30.5  # milliseconds
    assert parse_reset("1799999990", now) == 0.0  # already past
    assert parse_reset("soon", now) is None and parse_reset(None, now) is None


def test_rate_limit_hint_falls_back_to_message_words_then_reset_headers():
    err = error_from_response(
        429, {}, body("rate_limit_exceeded", message="Please retry after 6 seconds.")
    )
    assert err.retry_after == 6.0
    at = str(int(time.time()) + 30)
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": at}
    err = error_from_response(429, headers, body("rate_limit_exceeded", message="slow down"))
    assert err.retry_after is not None and 0 < err.retry_after <= 30  # not 1.8 billion seconds
    # a bucket with room left is not the reason
    headers = {
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "50s",
        "x-ratelimit-remaining-images": "0",
        "x-ratelimit-reset-images": "2s",
    }
    assert error_from_response(429, headers, body("rate_limit_exceeded")).retry_after == 2.0
