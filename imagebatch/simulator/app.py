"""An OpenAI-compatible Images API served by Starlette, for tests, benchmarks and offline runs.

Request flow for the three image endpoints:

    auth -> parse + validate (400/404, not counted) -> quota (429 insufficient_quota)
    -> RPM/IPM sliding window (429 rate_limit_exceeded, not counted) -> moderation (400)
    -> latency (+ stall) -> fault injection (500/503, drop, malformed) -> render, bill, 200

Images are billed when the response is produced (for drops and malformed bodies too),
never for requests rejected before that. The rules live in rules.py, faults in faults.py,
the success bodies in responses.py.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from imagebatch.configs.registry import Registry

from .batches import BatchService, asgi_line
from .batches import routes as batch_routes
from .config import SimConfig
from .failures import (
    ApiFailure,
    bad,
    json_bytes,
    moderation_failure,
    quota_failure,
    rate_limit_failure,
    restyle,
)
from .faults import (
    Drop,
    Silent,
    malformed_response,
    pick_fault,
    server_error,
    sleep_unless_disconnected,
)
from .request import Parsed, check_auth
from .responses import build_body
from .rules import LABEL, newest_family, parse_request
from .state import SimState

log = logging.getLogger("imagebatch.simulator")


class Simulator:
    def __init__(self, config: SimConfig, registry: Registry) -> None:
        self.state = SimState(config, registry)
        self.batches: BatchService | None = None  # the Files and Batch API, set by create_app

    def snapshot(self) -> dict[str, Any]:
        """Stats, with the Batch API's counts under `batch`."""
        data = self.state.stats.snapshot()
        if self.batches is not None:
            data["batch"] = self.batches.snapshot()
        return data

    @property
    def config(self) -> SimConfig:
        return self.state.config

    # ---------------------------------------------------------------- image endpoints
    async def generations(self, request: Request) -> Response:
        return await self._images(request, "generate")

    async def edits(self, request: Request) -> Response:
        return await self._images(request, "edit")

    async def variations(self, request: Request) -> Response:
        return await self._images(request, "variation")

    async def azure(self, request: Request) -> Response:
        """Azure's shapes: api-key auth, and an api-version without which nothing is found."""
        op = {"generations": "generate", "edits": "edit", "variations": "variation"}.get(
            request.path_params["op"]
        )
        if op is None or not request.query_params.get("api-version"):
            failure = ApiFailure(404, "Resource not found", None, None, "404")
            return Response(json_bytes(failure.body()), 404, media_type="application/json")
        return await self._images(
            request, op, default_model=request.path_params.get("deployment"), azure=True
        )

    async def _images(
        self,
        request: Request,
        operation: str,
        default_model: str | None = None,
        azure: bool = False,
    ) -> Response:
        t0 = time.perf_counter()
        st = self.state.stats
        st.requests_seen += 1
        st.per_endpoint[LABEL[operation]] += 1
        if azure:
            st.azure_deployments[request.path_params.get("deployment") or "(v1)"] += 1
        st.in_flight += 1
        st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
        extra_headers: dict[str, str] = {}
        try:
            if self.config.hold_until_in_flight:
                await self.state.hold(self.config.hold_until_in_flight, st.in_flight)
            try:
                response = await self._process(request, operation, default_model, azure)
            except ApiFailure as exc:
                echo = await _echo(request) if self.config.error_style == "fastapi" else None
                status, body = restyle(exc, self.config.error_style, echo)
                response = Response(json_bytes(body), status, media_type="application/json")
                extra_headers = exc.headers
            except Exception:
                log.exception("simulator bug while handling %s", request.url.path)
                failure = ApiFailure(
                    500, "The simulator failed while processing your request.", "server_error"
                )
                response = Response(json_bytes(failure.body()), 500, media_type="application/json")
        finally:
            self.state.stats.in_flight -= 1
        if isinstance(response, (Silent, Drop)):
            return response
        self.state.stats.status[str(response.status_code)] += 1
        cfg = self.config
        headers = response.headers
        headers["x-request-id"] = "req_" + secrets.token_hex(16)
        headers["openai-processing-ms"] = str(int((time.perf_counter() - t0) * 1000))
        headers["openai-organization"] = cfg.organization
        headers["openai-version"] = "2020-10-01"
        unix = cfg.reset_format == "unix"
        if cfg.ratelimit_headers:
            limits = self.state.limits.headers(cfg.rpm, cfg.ipm, cfg.window_seconds, unix=unix)
            for k, v in limits.items():
                headers[k] = v
        for k, v in extra_headers.items():
            headers[k] = v
        return response

    async def _process(
        self, request: Request, operation: str, default_model: str | None, azure: bool
    ) -> Response:
        state = self.state
        state.sync()
        cfg = self.config
        check_auth(request, cfg.api_key, azure)
        parsed = await parse_request(
            request, operation, default_model, state.registry, cfg.refuse_retired
        )
        state.stats.model(parsed.model)["requests"] += 1
        if not state.quota.try_reserve(parsed.n, cfg.quota_images):
            state.stats.quota_exceeded += 1
            raise quota_failure(cfg.quota_error)
        bill = _Bill(state, parsed)
        # A Batch API line has its own pool: no live rate limits, latency or faults.
        batch_line = bool(request.scope.get("imagebatch.batch_line"))
        try:
            self._admit(parsed, batch_line)
            return await self._answer(request, parsed, bill, batch_line)
        finally:
            bill.release()

    def _admit(self, parsed: Parsed, batch_line: bool = False) -> None:
        """The RPM/IPM windows (429, not billed; not for batch lines), then moderation (400)."""
        state, cfg = self.state, self.config
        st = state.stats
        rejection = (
            None
            if batch_line
            else state.limits.admit(parsed.n, cfg.rpm, cfg.ipm, cfg.window_seconds)
        )
        if rejection is not None:
            st.rate_limited += 1
            # every 1/rate-th 429 comes without retry-after (deterministic, no rng draw)
            rate, k = cfg.omit_retry_after_rate, st.rate_limited
            omit = int(k * rate) != int((k - 1) * rate)
            raise rate_limit_failure(parsed.model, cfg.organization, rejection, omit)
        word = cfg.moderation_word.strip().lower()
        if word and word in parsed.prompt.lower():
            st.moderated += 1
            raise moderation_failure(parsed.spec)

    async def _answer(
        self, request: Request, parsed: Parsed, bill: _Bill, batch_line: bool = False
    ) -> Response:
        """Latency, then an injected fault or the images (a batch line: the images at once)."""
        state, cfg = self.state, self.config
        st = state.stats
        rng = state.rng
        delay = cfg.latency_model().sample(rng) + max(0, parsed.n - 1) * cfg.latency_per_image
        u, u2 = rng.random(), rng.random()
        fault = None if batch_line else pick_fault(cfg, u)
        if batch_line:
            delay = 0.0
        if fault == "stall":
            st.faults["stall"] += 1
            delay += cfg.stall_seconds
        if delay > 0 and not await sleep_unless_disconnected(request, delay):
            st.client_disconnects += 1
            if cfg.bill_on_disconnect:
                bill()
            return Silent()
        if fault == "error":
            st.faults["error"] += 1
            raise server_error(u2, cfg.overload_status)
        if fault == "drop":
            st.faults["drop"] += 1
            bill()
            return Drop()
        if fault == "malformed":
            st.faults["malformed"] += 1
            bill()
            return malformed_response(u2)
        payload = await build_body(state, str(request.base_url), parsed)
        bill()
        st.requests_ok += 1
        st.model(parsed.model)["ok"] += 1
        return Response(json_bytes(payload), 200, media_type="application/json")

    # ---------------------------------------------------------------- other endpoints
    async def file(self, request: Request) -> Response:
        token = request.path_params["token"]
        now = time.monotonic()
        found = self.state.files.get(token, now)
        headers = {"x-request-id": "req_" + secrets.token_hex(16)}
        if found is None:
            failure = ApiFailure(
                404,
                "No such file (unknown or long-expired URL).",
                "invalid_request_error",
                None,
                "not_found",
            )
            return Response(
                json_bytes(failure.body()), 404, media_type="application/json", headers=headers
            )
        if found == "expired":
            failure = ApiFailure(
                410, "This URL has expired.", "invalid_request_error", None, "url_expired"
            )
            return Response(
                json_bytes(failure.body()), 410, media_type="application/json", headers=headers
            )
        assert isinstance(found, tuple)
        data, ctype = found
        self.state.stats.files_served += 1
        return Response(data, 200, media_type=ctype, headers=headers)

    async def models(self, request: Request) -> Response:
        azure = request.url.path.startswith("/openai/")
        try:
            check_auth(request, self.config.api_key, azure)
        except ApiFailure as exc:
            return Response(json_bytes(exc.body()), exc.status, media_type="application/json")
        name = request.path_params.get("model")
        reg = self.state.registry
        served = [
            m
            for m in reg.names()
            if not (self.config.refuse_retired and reg.models[m].is_retired())
        ]

        def entry(m: str) -> dict[str, Any]:
            return {"id": m, "object": "model", "created": 0, "owned_by": "imagebatch-simulator"}

        if name is None:
            return Response(
                json_bytes({"object": "list", "data": [entry(m) for m in served]}),
                media_type="application/json",
            )
        if reg.get(name) is None and newest_family(reg, name) is None:
            failure = ApiFailure(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
            return Response(json_bytes(failure.body()), 404, media_type="application/json")
        return Response(json_bytes(entry(name)), media_type="application/json")

    async def stats(self, request: Request) -> Response:
        return Response(json_bytes(self.snapshot()), media_type="application/json")

    async def reset(self, request: Request) -> Response:
        self.state.reset()
        return Response(json_bytes({"ok": True}), media_type="application/json")

    async def config_endpoint(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                data = json.loads(await request.body() or b"{}")
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object of settings")
                self.config.update(data)
                self.state.sync()
            except ValueError as exc:
                failure = bad(None, f"Invalid simulator config: {exc}")
                return Response(json_bytes(failure.body()), 400, media_type="application/json")
        return Response(json_bytes(self.config.to_dict()), media_type="application/json")

    async def health(self, request: Request) -> Response:
        return Response(json_bytes({"ok": True}), media_type="application/json")


class _Bill:
    """The images one request reserved from the quota: billed once, or released unbilled."""

    def __init__(self, state: SimState, parsed: Parsed) -> None:
        self.state = state
        self.parsed = parsed
        self.reserved = parsed.n

    def __call__(self) -> None:
        state, n = self.state, self.parsed.n
        state.quota.bill(self.reserved)
        self.reserved = 0
        state.stats.images_billed += n
        state.stats.requests_billed += 1
        state.stats.model(self.parsed.model)["images"] += n

    def release(self) -> None:
        if self.reserved:
            self.state.quota.release(self.reserved)


async def _echo(request: Request) -> Any:
    """The JSON request body, as a FastAPI server echoes it in a validation error."""
    try:
        return json.loads(await request.body() or b"null")
    except (ValueError, RuntimeError):
        return None


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    if status == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif status == 405:
        message = f"Method not allowed ({request.method} {request.url.path})"
    else:
        message = str(getattr(exc, "detail", "") or exc)
    failure = ApiFailure(status, message, "invalid_request_error")
    return Response(
        json_bytes(failure.body()),
        status,
        media_type="application/json",
        headers={"x-request-id": "req_" + secrets.token_hex(16)},
    )


def create_app(config: SimConfig | None = None, registry: Registry | None = None) -> Starlette:
    """The simulator as an ASGI app. `app.state.simulator.state` holds stats, limits and the config."""
    config = config if config is not None else SimConfig()
    sim = Simulator(config, registry if registry is not None else Registry.load())
    routes = [
        Route("/v1/images/generations", sim.generations, methods=["POST"]),
        Route("/v1/images/edits", sim.edits, methods=["POST"]),
        Route("/v1/images/variations", sim.variations, methods=["POST"]),
        # Azure OpenAI shapes: /openai/deployments/{deployment}/images/... and /openai/v1/images/...
        Route("/openai/deployments/{deployment}/images/{op:str}", sim.azure, methods=["POST"]),
        Route("/openai/v1/images/{op:str}", sim.azure, methods=["POST"]),
        Route("/v1/models", sim.models, methods=["GET"]),
        Route("/openai/models", sim.models, methods=["GET"]),
        Route("/v1/models/{model:path}", sim.models, methods=["GET"]),
        Route("/v1/_sim/files/{token}", sim.file, methods=["GET"]),
        Route("/v1/_sim/stats", sim.stats, methods=["GET"]),
        Route("/v1/_sim/reset", sim.reset, methods=["POST"]),
        Route("/v1/_sim/config", sim.config_endpoint, methods=["GET", "POST"]),
        Route("/v1/_sim/health", sim.health, methods=["GET"]),
    ]
    batches = BatchService(config, lambda *line: asgi_line(app, *line))
    routes.extend(batch_routes(batches))
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.simulator = sim
    app.state.batches = batches
    sim.batches = batches
    return app
