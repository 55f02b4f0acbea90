"""API client: one httpx client per run that turns a request unit into images or an ApiError.

It speaks the wire format only: which parameters a model accepts was settled by
`validate`; how often to try and how fast is `dispatch`'s business. The API key lives in
the client's default headers and nowhere else: errors carry the server's words, never
the request.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pybase64

from imagebatch.configs.settings import ApiSettings
from imagebatch.tasks.errors import AmbiguousError, ApiError, RequestError, TransientError
from imagebatch.tasks.plan import RequestUnit
from imagebatch.tasks.prepare import PreparedInputs, prepare_job
from imagebatch.tasks.redact import host_is_internal, scrub, secrets_of, shown_url
from imagebatch.tasks.retry import (
    error_from_response,
    error_from_transport,
    malformed_response_error,
    redact,
)

ENDPOINTS = {
    "generate": "images/generations",
    "edit": "images/edits",
    "variation": "images/variations",
}
POOL_SHARD = 32
JSON_SLACK = 1_000_000  # room for the JSON around the images (usage, revised prompts)
ERROR_BODY_CAP = 1_000_000  # an error body is read this far; the rest is never needed
# Bodies read at once. Each holds its whole buffer from its first byte; read round-robin, the
# answers that arrive together (64 in flight: up to 50 at once) all fill at the same time and
# peak together, 4 MB each. Read a few at a time, the rest wait in the socket, unread, and
# each is parsed, stored and freed before the next starts. Eight is far more than a loopback
# read needs (a 4 MB body takes milliseconds) or the fastest rate limit fills over the internet.
READERS = 8


@dataclass
class ApiImage:
    data: bytes | bytearray  # a downloaded image stays in the buffer it was read into
    revised_prompt: str | None = None


@dataclass
class ApiResult:
    images: list[ApiImage]
    request_id: str | None
    headers: httpx.Headers
    latency: float
    usage: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def azure_root(base_url: str) -> tuple[str, bool]:
    """For an Azure base URL: (the URL up to and including `/openai`, whether it is the v1 shape).

    `https://r.openai.azure.com`, `.../openai` and `.../openai/deployments` all mean the
    deployments shape; `.../openai/v1` is Azure's OpenAI-style shape, where the deployment
    name goes in `model`.
    """
    parts = urlsplit(base_url.rstrip("/"))
    path = parts.path.rstrip("/")
    if path.endswith("/openai/v1"):
        return base_url.rstrip("/"), True
    for tail in ("/openai/deployments", "/openai"):
        if path.endswith(tail):
            path = path[: -len(tail)]
            break
    return parts._replace(path=path + "/openai", query="", fragment="").geturl(), False


def auth_headers(api: ApiSettings) -> dict[str, str]:
    """Credentials and account headers for `api`: Azure takes `api-key`, everyone else Bearer."""
    headers = {"User-Agent": "imagebatch/0.1"}
    if api.api_key:
        if api.is_azure:
            headers["api-key"] = api.api_key
        else:
            headers["Authorization"] = f"Bearer {api.api_key}"
    if api.organization:
        headers["OpenAI-Organization"] = api.organization
    if api.project:
        headers["OpenAI-Project"] = api.project
    return headers


class ImagesClient:
    """Sends request units. Reuse one per run: it holds the connection pool."""

    def __init__(
        self,
        api: ApiSettings,
        *,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api = api
        self.azure = api.is_azure
        base_url = api.base_url
        self.azure_v1 = False
        if self.azure:
            base_url, self.azure_v1 = azure_root(api.base_url)
        headers = auth_headers(api)
        self.timeout = httpx.Timeout(
            connect=api.connect_timeout,
            read=api.read_timeout,
            write=api.write_timeout,
            pool=api.pool_timeout,
        )
        # httpcore scans its whole pool for every request, which cost a fifth of the client's
        # CPU with 200 connections in flight; several small pools keep each scan short.
        shards = max(1, -(-max_connections // POOL_SHARD))
        per_shard = -(-max_connections // shards)
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        self._pools = [
            httpx.AsyncClient(
                base_url=base_url.rstrip("/") + "/",
                headers=headers,
                timeout=self.timeout,
                limits=limits,
                transport=transport,
            )
            for _ in range(shards)
        ]
        self._busy = [0] * shards
        self._reading = asyncio.Semaphore(READERS)
        self._http = self._pools[0]  # for building requests
        # URLs in responses may point at another host: fetch them without our credentials,
        # and follow redirects by hand so every hop is checked (see _check_url).
        self._download = httpx.AsyncClient(
            timeout=self.timeout, limits=limits, follow_redirects=False
        )
        self._secrets = secrets_of(api.api_key, api.base_url)
        base_host = httpx.URL(api.base_url).host
        self._base_internal = host_is_internal(base_host) if base_host else False

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()
        await self._download.aclose()

    async def _exchange(self, request: httpx.Request, cap: int) -> tuple[httpx.Response, bytearray]:
        """Send on the least busy pool and read the answer as it streams, at most `cap`
        bytes of a 2xx body (ERROR_BODY_CAP of an error body): a body that declares or
        grows past the cap is refused without being held whole. At most READERS bodies are
        read at once; the wait counts toward the request deadline, as the read does."""
        shard = min(range(len(self._pools)), key=self._busy.__getitem__)
        self._busy[shard] += 1
        try:
            response = await self._pools[shard].send(request, stream=True)
            if response.status_code >= 400:  # cut, not refused: its first part says what went wrong
                cap, refuse = min(cap, ERROR_BODY_CAP), None
            else:
                refuse = functools.partial(_too_large, response, cap, self._secrets)
            try:
                async with self._reading:
                    body = await _read_capped(response, cap, refuse)
            finally:
                await response.aclose()
            return response, body
        finally:
            self._busy[shard] -= 1

    async def __aenter__(self) -> ImagesClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _path(self, unit: RequestUnit) -> tuple[str, dict[str, str]]:
        """Path (relative to the base URL) and query: Azure names the deployment in the path."""
        job = unit.planned.job
        path = ENDPOINTS[job.operation]
        if not self.azure:
            return path, {}
        query = {"api-version": self.api.api_version}
        if self.azure_v1:
            return path, query
        deployment = quote(job.deployment or job.model.name, safe="")
        return f"deployments/{deployment}/{path}", query

    def build_request(
        self, unit: RequestUnit, inputs: PreparedInputs | None = None
    ) -> httpx.Request:
        """The HTTP request for `unit`. Edits and variations send `inputs`, the prepared
        bytes (prepared here when not given)."""
        job = unit.planned.job
        path, query = self._path(unit)
        params: dict[str, Any] = {**job.params, "n": unit.n}
        if self.azure_v1:  # Azure's v1 shape names the deployment in `model`
            params["model"] = job.deployment or job.model.name
        if job.operation == "generate":
            return self._http.build_request("POST", path, params=query, json=params)
        if inputs is None:
            inputs = prepare_job(job)
        assert inputs is not None  # edits and variations always have sources
        # Multipart: never send nulls; numbers as decimal strings, as the official SDK does.
        fields = {k: str(v) for k, v in params.items() if v is not None}
        files: list[tuple[str, tuple[str, bytes, str]]] = []
        part = "image" if len(inputs.images) == 1 else "image[]"
        for image in inputs.images:
            files.append((part, (image.name, image.data, image.mime)))
        if inputs.mask is not None:
            files.append(("mask", (inputs.mask.name, inputs.mask.data, inputs.mask.mime)))
        return self._http.build_request("POST", path, params=query, data=fields, files=files)

    def response_cap(self, n: int) -> int:
        """The most bytes a 2xx answer for `n` images may have."""
        return n * self.api.max_response_bytes_per_image + JSON_SLACK

    async def send(self, unit: RequestUnit, inputs: PreparedInputs | None = None) -> ApiResult:
        """One request. Whatever the server echoes, the key never leaves in the result or an
        error: every text the server sent is masked (by value) where it is read or an error
        is built from it."""
        if inputs is None and unit.planned.job.operation != "generate":
            # Decoding and encoding photos takes CPU time: never on the event loop.
            inputs = await asyncio.to_thread(prepare_job, unit.planned.job)
        request = self.build_request(unit, inputs)
        started = time.monotonic()
        deadline = self.api.deadline
        try:
            async with asyncio.timeout(deadline):
                response, body = await self._exchange(request, self.response_cap(unit.n))
        except TimeoutError:
            raise AmbiguousError(
                f"no whole answer within the request deadline of {deadline:g} s "
                "([api] request_deadline); the request may have been billed",
                code="request_deadline",
            ) from None
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self._secrets) from None
        except httpx.DecodingError:  # a 2xx whose body does not decode (broken gzip)
            raise malformed_response_error("the response body does not decode", 200, None) from None
        except httpx.HTTPError as exc:  # too many redirects, an invalid URL: not transient
            raise RequestError(
                redact(f"the request failed: {type(exc).__name__}: {exc}", self._secrets),
                code="http_error",
            ) from None
        latency = time.monotonic() - started
        request_id = scrub(response.headers.get("x-request-id"), self._secrets)
        if response.status_code >= 400:
            error = error_from_response(
                response.status_code, response.headers, bytes(body), self._secrets
            )
            error.headers = response.headers
            raise error
        parsed = _json_once(body, response.status_code, request_id)
        if (
            not isinstance(parsed, dict)
            or not isinstance(parsed.get("data"), list)
            or not parsed["data"]
        ):
            if isinstance(parsed, dict) and "error" in parsed:
                error_body = json.dumps(parsed).encode()
                raise error_from_response(500, response.headers, error_body, self._secrets)
            raise malformed_response_error(
                "the response has no image data", response.status_code, request_id
            )
        images = []
        for item in parsed["data"]:
            images.append(await self._image(item, request_id))
        usage = parsed.get("usage") if isinstance(parsed.get("usage"), dict) else None
        extra = {
            k: parsed[k] for k in ("size", "quality", "output_format", "background") if k in parsed
        }
        return ApiResult(images, request_id, response.headers, latency, usage, extra)

    async def _image(self, item: Any, request_id: str | None) -> ApiImage:
        if not isinstance(item, dict):
            raise malformed_response_error("an image entry is not an object", 200, request_id)
        revised = (
            scrub(item["revised_prompt"], self._secrets)
            if isinstance(item.get("revised_prompt"), str)
            else None
        )
        if isinstance(item.get("b64_json"), str):
            # Taken out of the parsed body, so the text is freed as soon as it is decoded.
            # pybase64 reads the str in place and decodes with SIMD: 0.2 ms for a 4 MB image
            # against 10 ms for binascii, a sixth of the client's CPU per image (same strict
            # rules: only the alphabet, padding only at the end).
            text = item.pop("b64_json")
            try:
                return ApiImage(pybase64.b64decode(text, validate=True), revised)
            except (binascii.Error, ValueError):
                raise malformed_response_error(
                    "b64_json is not valid base64", 200, request_id
                ) from None
        if isinstance(item.get("url"), str):
            return ApiImage(await self.download(item["url"], request_id), revised)
        raise malformed_response_error(
            "an image entry has neither b64_json nor url", 200, request_id
        )

    async def download(self, url: str, request_id: str | None = None, tries: int = 4) -> bytearray:
        """Fetch an image URL at once (they expire), refusing bodies over the configured cap.

        The image is already paid for, so a download that fails for a transient reason is
        tried again here, and one that still fails (or can never work: `file://`, a redirect
        loop, an internal address) fails the image: asking again would pay for a new one."""
        deadline = self.api.deadline
        for attempt in range(1, tries + 1):
            try:
                async with asyncio.timeout(deadline):
                    return await self._download_once(url, request_id)
            except TimeoutError:
                error = TransientError(
                    f"downloading the image URL {self._shown(url)} took longer than the request "
                    f"deadline of {deadline:g} s ([api] request_deadline)",
                    code="request_deadline",
                    request_id=request_id,
                )
            except TransientError as caught:
                error = caught
            if attempt < tries:
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
                continue
            raise RequestError(
                f"{error.message} (tried {tries} times; the image was not generated again)",
                status=error.status,
                code="download_failed",
                request_id=request_id,
            )
        raise AssertionError("unreachable")

    def _shown(self, url: str) -> str:
        """An image URL for a message: no query, and no secret a hostile server put in it."""
        return scrub(shown_url(url), self._secrets)

    async def _check_url(self, url: httpx.URL, request_id: str | None) -> None:
        """Only http(s) URLs, and internal addresses only when the base URL is internal too."""
        shown = self._shown(str(url))
        if url.scheme not in ("http", "https") or not url.host:
            raise RequestError(
                f"the image URL {shown} cannot be fetched (only absolute http and https URLs)",
                code="image_url_unfetchable",
                request_id=request_id,
            )
        if not self._base_internal and await asyncio.to_thread(host_is_internal, url.host):
            raise RequestError(
                f"the image URL {shown} points at a loopback, private or link-local address; "
                "refused, as the base URL is not one",
                code="image_url_refused",
                request_id=request_id,
            )

    async def _download_once(self, url: str, request_id: str | None, hops: int = 5) -> bytearray:
        try:
            target = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            target = httpx.URL("invalid:")
        for _ in range(hops + 1):
            await self._check_url(target, request_id)
            try:
                async with self._download.stream("GET", target) as response:
                    if response.is_redirect and "location" in response.headers:
                        target = target.join(response.headers["location"])
                        continue
                    return await self._read_image(response, str(target), request_id)
            except httpx.TransportError as exc:
                error = error_from_transport(exc, self._secrets)
                # Whatever the class for an API call, a lost download is worth another try.
                raise TransientError(
                    f"downloading the image URL {self._shown(str(target))} failed: {error.message}",
                    code=error.code,
                    request_id=request_id,
                ) from None
            except httpx.HTTPError as exc:  # an invalid URL, a broken stream: never fetchable
                raise RequestError(
                    redact(
                        f"the image URL {self._shown(str(target))} cannot be fetched: {exc}",
                        self._secrets,
                    ),
                    code="image_url_unfetchable",
                    request_id=request_id,
                ) from None
        raise RequestError(
            f"the image URL {self._shown(url)} redirects more than {hops} times",
            code="image_url_unfetchable",
            request_id=request_id,
        )

    async def _read_image(
        self, response: httpx.Response, url: str, request_id: str | None
    ) -> bytearray:
        cap = self.api.max_download_bytes
        shown = self._shown(url)
        if response.status_code >= 400:
            error_class = (
                TransientError
                if response.status_code >= 500 or response.status_code in (408, 429)
                else RequestError
            )
            raise error_class(
                f"downloading the image URL {shown} failed with HTTP {response.status_code}",
                status=response.status_code,
                code="download_failed",
                request_id=request_id,
            )

        def refuse(what: str) -> RequestError:
            return RequestError(
                f"the image at {shown} is over the {cap:,} byte cap ({what})",
                code="download_too_large",
                request_id=request_id,
            )

        return await _read_capped(response, cap, refuse)


async def _read_capped(
    response: httpx.Response, cap: int, refuse: Callable[[str], ApiError] | None
) -> bytearray:
    """The (decoded) body in one buffer, filled as it streams: a declared length is
    allocated once and filled in place, so no copy is made as it grows and none when it is
    done. Past `cap`, declared or read, `refuse(what)` is raised before more is read; with
    no `refuse` the body is cut at `cap` instead."""
    declared = _declared_length(response)
    if declared > cap and refuse is not None:
        raise refuse(f"it declares {declared:,} bytes")
    body = bytearray(min(declared, cap))
    filled = 0
    async for chunk in response.aiter_bytes():
        end = filled + len(chunk)
        if end > cap:
            if refuse is not None:
                raise refuse(f"{end:,} bytes read")
            body[filled:] = chunk[: cap - filled]
            return body
        body[filled:end] = chunk
        filled = end
    del body[filled:]
    return body


def _declared_length(response: httpx.Response) -> int:
    declared = response.headers.get("content-length", "")
    encoded = response.headers.get("content-encoding", "identity").strip().lower()
    # A compressed body grows when decoded; its decoded bytes are counted as they come.
    return int(declared) if declared.isdigit() and encoded in ("", "identity") else 0


def _too_large(
    response: httpx.Response, cap: int, secrets: tuple[str, ...], what: str
) -> RequestError:
    """Not retried (the same request would bring the same answer, and bill it again); the
    answer was a 2xx, so the dispatcher counts it as possibly paid."""
    return RequestError(
        f"the answer is over the cap of {cap:,} bytes ({what}; [api] "
        "max_response_bytes_per_image times the images asked for, plus 1 MB): refused "
        "without reading the rest",
        status=response.status_code,
        code="response_too_large",
        request_id=scrub(response.headers.get("x-request-id"), secrets),
    )


def _json_once(body: bytearray, status: int, request_id: str | None) -> Any:
    """Parse the body with one text copy at a time: the buffer is emptied once decoded, and
    the text is dropped once parsed (it lives only in this frame)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise malformed_response_error(
            "the response body is not JSON", status, request_id
        ) from None
    size = len(body)
    body.clear()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise malformed_response_error(
            f"the response body ({size:,} bytes) is not JSON", status, request_id
        ) from None
