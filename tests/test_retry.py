import asyncio
import json
import time
from email.utils import formatdate, parsedate_to_datetime

import httpx
import pytest

from imagebatch.configs.settings import RetrySettings
from imagebatch.tasks.errors import (
    AmbiguousError,
    ApiError,
    FatalError,
    ModelUnavailable,
    RateLimited,
    RejectedError,
    RequestError,
    TransientError,
)
from imagebatch.tasks.headers import parse_duration, parse_retry_after
from imagebatch.tasks.retry import (
    error_from_response,
    error_from_transport,
    malformed_response_error,
)
from imagebatch.tasks.retry_policy import retry_wait, retrying


def body(code=None, type=None, message="boom", param=None, **extra):
    err = {"message": message, "type": type, "param": param, "code": code}
    err.update(extra)
    return json.dumps({"error": err}).encode()


# -- durations and hints ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("240ms", 0.24),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("500us", 0.0005),
        ("3", 3.0),
        ("0.25", 0.25),
        ("0", 0.0),
        (" 7s ", 7.0),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "abc", "1x", "1s2", "-1s", "inf", "nan", "1 s", "ms1"])
def test_parse_duration_rejects(text):
    assert parse_duration(text) is None


HTTP_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"
DATE_TS = parsedate_to_datetime(HTTP_DATE).timestamp()


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After-Ms": "1500.5"}, 1.5005),
        ({"retry-after": "3"}, 3.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after-ms": "100", "retry-after": "9"}, 0.1),  # ms first
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),  # bad ms falls through
        ({"retry-after": HTTP_DATE}, 30.0),  # date, 30 s after `now`
        ({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0),  # in the past
        ({"retry-after": "whenever"}, None),
        ({"retry-after": "-5"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers, expected):
    got = parse_retry_after(headers, now=DATE_TS - 30)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_parse_retry_after_httpx_headers_and_default_now():
    assert parse_retry_after(httpx.Headers({"RETRY-AFTER-MS": "40"})) == pytest.approx(0.04)
    future = formatdate(time.time() + 100, usegmt=True)
    assert 95 <= parse_retry_after({"retry-after": future}) <= 101


# -- classification ---------------------------------------------------------------------------


CASES = [
    # status, body, headers, class, code
    (
        400,
        body("moderation_blocked", "image_generation_user_error"),
        {},
        RejectedError,
        "moderation_blocked",
    ),
    (
        400,
        body("content_policy_violation", "invalid_request_error"),
        {},
        RejectedError,
        "content_policy_violation",
    ),
    (400, body("contentFilter"), {}, RejectedError, "contentFilter"),
    (400, body("content_filter"), {}, RejectedError, "content_filter"),
    (
        400,
        body("BadRequest", inner_error={"code": "ResponsibleAIPolicyViolation"}),
        {},
        RejectedError,
        "BadRequest",
    ),
    (
        400,
        body(None, innererror={"code": "ResponsibleAIPolicyViolation"}),
        {},
        RejectedError,
        "http_400",
    ),
    (422, body("moderation_blocked"), {}, RejectedError, "moderation_blocked"),
    (
        400,
        body("invalid_value", "invalid_request_error", param="size"),
        {},
        RequestError,
        "invalid_value",
    ),
    (422, body("unprocessable"), {}, RequestError, "unprocessable"),
    (413, b"too big", {}, RequestError, "http_413"),
    (415, body(None, "invalid_request_error"), {}, RequestError, "invalid_request_error"),
    (408, b"", {}, TransientError, "http_408"),
    (409, body("conflict"), {}, TransientError, "conflict"),
    (500, body(None, "server_error"), {}, TransientError, "server_error"),
    (502, b"<html>Bad gateway</html>", {}, TransientError, "http_502"),
    (503, b"", {}, TransientError, "http_503"),
    (429, body("rate_limit_exceeded", "requests"), {}, RateLimited, "rate_limit_exceeded"),
    (429, body("insufficient_quota", "insufficient_quota"), {}, FatalError, "insufficient_quota"),
    (429, body(None, "insufficient_quota"), {}, FatalError, "insufficient_quota"),
    (401, body("invalid_api_key"), {}, FatalError, "invalid_api_key"),
    (
        403,
        body("unsupported_country_region_territory"),
        {},
        FatalError,
        "unsupported_country_region_territory",
    ),
    (
        404,
        body("model_not_found", "invalid_request_error"),
        {},
        ModelUnavailable,
        "model_not_found",
    ),
    (404, b"Not Found", {}, FatalError, "http_404"),
    (302, b"", {}, RequestError, "http_302"),
    # x-should-retry
    (400, body("invalid_value"), {"x-should-retry": "true"}, TransientError, "invalid_value"),
    (
        400,
        body("moderation_blocked"),
        {"x-should-retry": "true"},
        RejectedError,
        "moderation_blocked",
    ),
    (401, body("invalid_api_key"), {"X-Should-Retry": "true"}, FatalError, "invalid_api_key"),
    (429, body("insufficient_quota"), {"x-should-retry": "true"}, FatalError, "insufficient_quota"),
    (503, b"", {"x-should-retry": "false"}, RequestError, "http_503"),
    (409, body("conflict"), {"x-should-retry": "false"}, RequestError, "conflict"),
    (
        429,
        body("rate_limit_exceeded"),
        {"x-should-retry": "false"},
        RateLimited,
        "rate_limit_exceeded",
    ),
]


@pytest.mark.parametrize("status, payload, headers, cls, code", CASES)
def test_classification(status, payload, headers, cls, code):
    err = error_from_response(status, headers, payload)
    assert type(err) is cls
    assert err.status == status
    assert err.error_code == code


def test_response_fields():
    headers = httpx.Headers({"X-Request-Id": "req_123", "Retry-After": "7"})
    err = error_from_response(
        429, headers, body("rate_limit_exceeded", "images", "slow down", param="n")
    )
    assert (err.message, err.code, err.type, err.param) == (
        "slow down",
        "rate_limit_exceeded",
        "images",
        "n",
    )
    assert err.request_id == "req_123"
    assert err.retry_after == 7.0
    assert err.should_retry is None
    assert str(err) == "429 rate_limit_exceeded: slow down"


def test_should_retry_recorded():
    assert error_from_response(500, {"x-should-retry": "true"}, b"").should_retry is True
    assert error_from_response(500, {"x-should-retry": "false"}, b"").should_retry is False
    assert error_from_response(500, {"x-should-retry": "maybe"}, b"").should_retry is None


def test_rate_limit_hint_from_message():
    msg = "Rate limit reached for gpt-image-2 on input-images per min: Limit 250, Used 250, Requested 1. Please try again in 240ms."
    assert error_from_response(
        429, {}, body("rate_limit_exceeded", message=msg)
    ).retry_after == pytest.approx(0.24)
    msg2 = "Please try again in 1m30s. Visit ..."
    assert error_from_response(
        429, {}, body("rate_limit_exceeded", message=msg2)
    ).retry_after == pytest.approx(90)
    # a header beats the message
    assert error_from_response(
        429, {"retry-after-ms": "500"}, body(message=msg)
    ).retry_after == pytest.approx(0.5)
    assert (
        error_from_response(429, {}, body("rate_limit_exceeded", message="no hint")).retry_after
        is None
    )


def test_unparseable_bodies():
    err = error_from_response(500, {}, b"x" * 5000)
    assert err.message.startswith("xxx") and len(err.message) <= 500
    err = error_from_response(400, {}, b'{"detail": "nope"}')
    assert type(err) is RequestError and err.message == "nope"
    assert error_from_response(400, {}, b'{"error": "plain text"}').message == "plain text"
    assert error_from_response(502, {}, b"").message == "empty response body"
    err = error_from_response(400, {}, b'{"error": {"code": 123}}')
    assert err.code == "123" and err.message  # tolerant of odd types and a missing message
    assert error_from_response(400, {}, b"\xff\xfe{").message  # not UTF-8


def test_messages_never_carry_a_key():
    err = error_from_response(
        401,
        {},
        body(
            "invalid_api_key", message="Incorrect API key provided: sk-proj-abcdefghijklmnop1234."
        ),
    )
    assert "abcdefghijklmnop" not in str(err)
    exc = httpx.ConnectError("failed for sk-abcdefghijklmnopqrstuv")
    assert "abcdefghijklmnop" not in str(error_from_transport(exc))


# -- transport ----------------------------------------------------------------------------------

REQ = httpx.Request("POST", "https://api.openai.com/v1/images/generations")


@pytest.mark.parametrize(
    "exc, cls, code, words",
    [
        (httpx.ConnectError("refused", request=REQ), TransientError, "connect_error", "not sent"),
        (
            httpx.ConnectTimeout("slow", request=REQ),
            TransientError,
            "connect_timeout",
            "connect timeout",
        ),
        (httpx.PoolTimeout("busy", request=REQ), TransientError, "pool_timeout", "not sent"),
        (
            httpx.WriteError("pipe", request=REQ),
            TransientError,
            "write_error",
            "sending the request body",
        ),
        (httpx.WriteTimeout("slow", request=REQ), TransientError, "write_timeout", "write timeout"),
        (
            httpx.ReadTimeout("slow", request=REQ),
            AmbiguousError,
            "read_timeout",
            "read timeout after the request was sent",
        ),
        (
            httpx.ReadError("reset", request=REQ),
            AmbiguousError,
            "read_error",
            "after the request was sent",
        ),
        (
            httpx.RemoteProtocolError("Server disconnected", request=REQ),
            AmbiguousError,
            "remote_protocol_error",
            "after the request was sent",
        ),
        (
            httpx.UnsupportedProtocol("ftp", request=REQ),
            FatalError,
            "unsupported_protocol",
            "scheme",
        ),
        (TimeoutError(), AmbiguousError, "timeout", "timed out"),
        (ValueError("bug"), RequestError, "client_error", "ValueError"),
    ],
)
def test_transport_errors(exc, cls, code, words):
    err = error_from_transport(exc)
    assert type(err) is cls
    assert err.code == code
    assert err.status is None
    assert words in err.message


def test_transport_passes_api_errors_through():
    original = RejectedError("no")
    assert error_from_transport(original) is original


def test_malformed_response():
    err = malformed_response_error("no image data", 200, "req_9")
    assert type(err) is TransientError
    assert (err.status, err.code, err.request_id) == (200, "malformed_response", "req_9")
    assert "no image data" in err.message


# -- retry_wait ----------------------------------------------------------------------------------

S = RetrySettings(
    max_attempts=5, max_total_seconds=900, backoff_initial=0.5, backoff_max=30, max_server_hint=120
)


def never():
    raise AssertionError("rand must not be used")


def test_hint_is_waited_exactly():
    assert retry_wait(RateLimited("x", retry_after=2.5), 0, S, never) == 2.5
    assert retry_wait(TransientError("x", retry_after=120.0), 3, S, never) == 120.0


def test_hint_over_cap_means_no_retry():
    assert retry_wait(RateLimited("x", retry_after=120.5), 0, S, never) is None
    assert retry_wait(TransientError("x", retry_after=3600), 0, S, never) is None


def test_zero_hint_falls_back_to_backoff():
    assert retry_wait(TransientError("x", retry_after=0.0), 0, S, lambda: 1.0) == 0.5


@pytest.mark.parametrize(
    "k, ceiling",
    [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (40, 30.0), (10_000, 30.0)],
)
def test_full_jitter_bounds(k, ceiling):
    err = TransientError("x")
    assert retry_wait(err, k, S, lambda: 1.0) == pytest.approx(ceiling)
    assert retry_wait(err, k, S, lambda: 0.0) == 0.0
    assert retry_wait(err, k, S, lambda: 0.25) == pytest.approx(0.25 * ceiling)


@pytest.mark.parametrize(
    "err",
    [
        RejectedError("x"),
        RequestError("x"),
        FatalError("x"),
        ApiError("x"),
        ValueError("x"),
        TransientError("x", should_retry=False),
        RateLimited("x", should_retry=False),
    ],
)
def test_not_retryable(err):
    assert retry_wait(err, 0, S, lambda: 0.5) is None


def test_ambiguous_follows_setting():
    err = AmbiguousError("lost")
    assert retry_wait(err, 0, RetrySettings(on_ambiguous="retry"), lambda: 1.0) == 0.5
    assert retry_wait(err, 0, RetrySettings(on_ambiguous="fail"), lambda: 1.0) is None


# -- the tenacity policy ----------------------------------------------------------------------------


class FakeSleep:
    def __init__(self):
        self.calls = []

    async def __call__(self, seconds):
        self.calls.append(seconds)


def run_policy(settings, outcomes, rand=lambda: 1.0):
    """Drive `retrying` against a call that raises/returns `outcomes` in turn."""
    sleep = FakeSleep()
    retries = []
    attempts = []

    async def main():
        async for attempt in retrying(
            settings,
            on_retry=lambda e, n, w: retries.append((type(e), n, w)),
            sleep=sleep,
            rand=rand,
        ):
            with attempt:
                attempts.append(1)
                outcome = outcomes[len(attempts) - 1]
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome

    try:
        result = asyncio.run(main())
    except BaseException as exc:
        result = exc
    return result, len(attempts), sleep.calls, retries


def test_policy_retries_transient_until_success():
    result, attempts, sleeps, retries = run_policy(
        S, [TransientError("a"), RateLimited("b", retry_after=3), "ok"]
    )
    assert result == "ok"
    assert attempts == 3
    assert sleeps == [0.5, 3]
    assert retries == [(TransientError, 1, 0.5), (RateLimited, 2, 3)]


@pytest.mark.parametrize(
    "err", [RejectedError("r"), RequestError("q"), FatalError("f"), KeyError("bug")]
)
def test_policy_never_retries_final_errors(err):
    result, attempts, sleeps, retries = run_policy(S, [err, "ok"])
    assert result is err
    assert attempts == 1 and sleeps == [] and retries == []


def test_policy_ambiguous_depends_on_setting():
    ok, attempts, _, _ = run_policy(
        RetrySettings(on_ambiguous="retry"), [AmbiguousError("lost"), "ok"]
    )
    assert (ok, attempts) == ("ok", 2)
    err = AmbiguousError("lost")
    result, attempts, sleeps, _ = run_policy(RetrySettings(on_ambiguous="fail"), [err, "ok"])
    assert result is err and attempts == 1 and sleeps == []


def test_policy_stops_after_max_attempts_and_reraises_the_api_error():
    errors = [TransientError(f"e{i}") for i in range(10)]
    result, attempts, sleeps, retries = run_policy(S, errors)
    assert result is errors[4]  # the ApiError itself, not tenacity.RetryError
    assert attempts == 5
    assert sleeps == [0.5, 1.0, 2.0, 4.0]
    assert [n for _, n, _ in retries] == [1, 2, 3, 4]


def test_policy_stops_before_exceeding_total_time():
    settings = RetrySettings(max_attempts=50, max_total_seconds=25, max_server_hint=120)
    errors = [RateLimited(f"e{i}", retry_after=10) for i in range(10)]
    result, attempts, sleeps, _ = run_policy(settings, errors)
    assert result is errors[2]
    assert attempts == 3 and sleeps == [10, 10]


def test_policy_gives_up_on_a_hint_over_the_cap():
    err = RateLimited("daily", retry_after=3600)
    result, attempts, sleeps, _ = run_policy(S, [err, "ok"])
    assert result is err and attempts == 1 and sleeps == []


def test_policy_jitter_uses_rand():
    values = iter([0.1, 0.9])
    result, _, sleeps, _ = run_policy(
        S, [TransientError("a"), TransientError("b"), "ok"], rand=lambda: next(values)
    )
    assert result == "ok"
    assert sleeps == [pytest.approx(0.05), pytest.approx(0.9)]


def test_rate_limit_answers_do_not_use_up_attempts():
    # 5 attempts allowed; 429s between transient errors do not count, so the 4 transient
    # failures plus 6 rate limits still end in success on the 11th call.
    outcomes = (
        [RateLimited("r", retry_after=1)] * 6 + [TransientError(f"t{i}") for i in range(4)] + ["ok"]
    )
    result, attempts, _, _ = run_policy(S, outcomes)
    assert result == "ok" and attempts == 11
    errors = [TransientError(f"t{i}") for i in range(5)]
    result, attempts, _, _ = run_policy(S, [RateLimited("r", retry_after=1)] * 3 + errors)
    assert result is errors[4] and attempts == 8
