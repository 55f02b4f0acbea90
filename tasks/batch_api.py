"""Batch API client: the Files and Batches calls a batch run needs, over httpx.

Same headers, key handling, timeouts and error classes as the Images client; transient
failures are retried under the run's retry policy. Creating a batch is the one call that
must never happen twice for one input file, so `create_or_adopt` looks for an existing
batch of that file before every attempt (the answer to a create may be lost). File
contents are streamed to disk, never held whole.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from imagebatch.configs.settings import ApiSettings, RetrySettings
from imagebatch.tasks.api_client import auth_headers
from imagebatch.tasks.files import fsync_dir
from imagebatch.tasks.redact import scrub, secrets_of
from imagebatch.tasks.retry import (
    error_from_response,
    error_from_transport,
    malformed_response_error,
)
from imagebatch.tasks.retry_policy import retrying

TERMINAL = ("completed", "failed", "expired", "cancelled")
LIST_PAGE = 100
# Batches created longer than this before our intent cannot be ours: listing stops there.
LIST_SLACK_SECONDS = 3600


class BatchApi:
    def __init__(self, api: ApiSettings, retry: RetrySettings) -> None:
        self.retry = retry
        self.secrets = secrets_of(api.api_key, api.base_url)  # masked in every error
        self._http = httpx.AsyncClient(
            base_url=api.base_url.rstrip("/") + "/",
            headers=auth_headers(api),
            timeout=httpx.Timeout(
                connect=api.connect_timeout,
                read=api.read_timeout,
                write=api.write_timeout,
                pool=api.pool_timeout,
            ),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> BatchApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One JSON call with retries for what can be retried."""
        async for attempt in retrying(self.retry):
            with attempt:
                return await self._once(method, path, **kwargs)
        raise AssertionError("unreachable")

    async def _once(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.secrets) from None
        if response.status_code >= 400:
            error = error_from_response(
                response.status_code, response.headers, response.content, self.secrets
            )
            error.headers = response.headers
            raise error
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            raise malformed_response_error(
                f"{method} {path}: the answer is not a JSON object",
                response.status_code,
                scrub(response.headers.get("x-request-id"), self.secrets),
            )
        return body

    # ------------------------------------------------------------------ files
    async def upload(self, path: Path) -> str:
        """Upload a JSONL input file (purpose=batch); returns its file id.

        A retry after a lost answer may leave an orphan file on the account: harmless, it is
        never used."""
        async for attempt in retrying(self.retry):
            with attempt, path.open("rb") as f:
                body = await self._once(
                    "POST",
                    "files",
                    data={"purpose": "batch"},
                    files={"file": (path.name, f, "application/jsonl")},
                )
                if not isinstance(body.get("id"), str):
                    raise malformed_response_error("the uploaded file has no id", 200, None)
                return body["id"]
        raise AssertionError("unreachable")

    async def download(self, file_id: str, dest: Path) -> Path:
        """Stream a file's content to `dest` (via a temp file, fsynced); never held in memory."""
        async for attempt in retrying(self.retry):
            with attempt:
                await self._download_once(file_id, dest)
                return dest
        raise AssertionError("unreachable")

    async def _download_once(self, file_id: str, dest: Path) -> None:
        tmp = dest.with_name(f".tmp-{dest.name}.{secrets.token_hex(4)}")
        try:
            async with self._http.stream("GET", f"files/{file_id}/content") as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_response(
                        response.status_code, response.headers, response.content, self.secrets
                    )
                with tmp.open("wb") as out:
                    async for chunk in response.aiter_bytes(1 << 20):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.secrets) from None
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ batches
    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self._call("GET", f"batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._call("POST", f"batches/{batch_id}/cancel")

    async def batches(self, since: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every batch of the account, newest first; stops at those created before `since`."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": LIST_PAGE}
            if after:
                params["after"] = after
            page = await self._call("GET", "batches", params=params)
            raw = page.get("data")
            data: list[Any] = raw if isinstance(raw, list) else []
            for batch in data:
                if not isinstance(batch, dict):
                    continue
                created = batch.get("created_at")
                if since is not None and isinstance(created, int | float) and created < since:
                    return
                yield batch
            if not page.get("has_more") or not data:
                return
            after = data[-1].get("id")

    async def find(
        self, input_file_id: str, part: str, since: float | None
    ) -> dict[str, Any] | None:
        """The batch already created for this input file (or tagged with this part), if any."""
        floor = None if since is None else since - LIST_SLACK_SECONDS
        async for batch in self.batches(floor):
            raw = batch.get("metadata")
            meta: dict[str, Any] = raw if isinstance(raw, dict) else {}
            if batch.get("input_file_id") == input_file_id or meta.get("imagebatch_part") == part:
                return batch
        return None

    async def create_or_adopt(
        self, input_file_id: str, endpoint: str, part: str, since: float | None
    ) -> tuple[dict[str, Any], bool]:
        """Create the batch for this file unless one exists already; every attempt looks first.
        Returns the batch and whether it already existed.

        The dangerous crash window is after the server created the batch and before its id is
        on our disk; looking up batches by input file id (and our metadata tag) closes it."""
        async for attempt in retrying(self.retry):
            with attempt:
                found = await self.find(input_file_id, part, since)
                if found is not None:
                    return found, True
                created = await self._once(
                    "POST",
                    "batches",
                    json={
                        "input_file_id": input_file_id,
                        "endpoint": endpoint,
                        "completion_window": "24h",
                        "metadata": {"imagebatch_part": part},
                    },
                )
                return created, False
        raise AssertionError("unreachable")


def batch_error_summary(batch: dict[str, Any]) -> str:
    """The reasons a batch failed validation, as the server gave them."""
    errors = batch.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    if not isinstance(data, list) or not data:
        return f"the batch ended {batch.get('status')}"
    parts = []
    for e in data[:5]:
        if isinstance(e, dict):
            where = f" (line {e['line']})" if e.get("line") else ""
            parts.append(f"{e.get('code')}: {e.get('message')}{where}")
    more = f" and {len(data) - 5} more" if len(data) > 5 else ""
    return "; ".join(parts) + more


def is_terminal(batch: dict[str, Any]) -> bool:
    return batch.get("status") in TERMINAL
