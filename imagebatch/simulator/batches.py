"""The Files API (purpose=batch) and the Batch API, as api.openai.com serves them for images.

Uploaded and produced files live on disk in a private temporary folder, never whole in
memory: an output file of gigabytes streams out of `GET /v1/files/{id}/content`.

A batch walks validating -> in_progress -> finalizing -> completed (or failed, expired,
cancelling -> cancelled) in a background task on the server's loop, at the pace set in
`SimConfig` (`batch_*` knobs). Each line runs through the same parsing, moderation,
rendering and billing as a live request, without the live rate limits, latency and faults
(the Batch API has its own pool). Output and error files have the official line shape:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .config import SimConfig

log = logging.getLogger("imagebatch.simulator")

BATCH_ENDPOINTS = ("/v1/images/generations", "/v1/images/edits")
TERMINAL = ("completed", "failed", "expired", "cancelled")
CHUNK = 1 << 16


def _error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return JSONResponse(body, status, headers={"x-request-id": "req_" + secrets.token_hex(16)})


@dataclass
class SimFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    path: Path

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class SimBatch:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    created: float
    expires: float
    headers: list[tuple[bytes, bytes]]  # auth and host of the creating request, for its lines
    status: str = "validating"
    times: dict[str, int] = field(default_factory=dict)
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created),
            "in_progress_at": self.times.get("in_progress"),
            "expires_at": int(self.expires),
            "finalizing_at": self.times.get("finalizing"),
            "completed_at": self.times.get("completed"),
            "failed_at": self.times.get("failed"),
            "expired_at": self.times.get("expired"),
            "cancelling_at": self.times.get("cancelling"),
            "cancelled_at": self.times.get("cancelled"),
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }


# (method, url, JSON body, headers) -> (status, response body, request id)
LineRunner = Callable[[str, dict[str, Any], list[tuple[bytes, bytes]]], Any]


class BatchService:
    """Files and batches of one simulator. `run_line` executes one request line in-process."""

    def __init__(self, config: SimConfig, run_line: LineRunner) -> None:
        self.config = config
        self.run_line = run_line
        self.dir = Path(tempfile.mkdtemp(prefix="imagebatch-sim-files-"))
        self.files: dict[str, SimFile] = {}
        self.batches: dict[str, SimBatch] = {}
        self.stats: Counter[str] = Counter()

    def close(self) -> None:
        for batch in self.batches.values():
            if batch.task is not None:
                batch.task.cancel()
        shutil.rmtree(self.dir, ignore_errors=True)

    def snapshot(self) -> dict[str, Any]:
        return {
            **{
                k: self.stats.get(k, 0)
                for k in ("files_uploaded", "batches_created", "lines_run", "images_billed")
            },
            "by_status": dict(Counter(b.status for b in self.batches.values())),
        }

    # ------------------------------------------------------------------ files
    def _new_file(self, filename: str, purpose: str, src: Path) -> SimFile:
        file_id = "file-" + secrets.token_hex(12)
        path = self.dir / file_id
        os.replace(src, path)
        f = SimFile(file_id, filename, purpose, path.stat().st_size, int(time.time()), path)
        self.files[file_id] = f
        return f

    async def upload(self, request: Request) -> Response:
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as exc:
            return _error(400, f"Could not parse the multipart/form-data body: {exc}")
        try:
            purpose, upload = form.get("purpose"), form.get("file")
            if not isinstance(upload, UploadFile):
                return _error(400, "Missing required parameter: 'file'.", None, "file")
            if purpose not in ("batch", "vision", "user_data", "assistants", "fine-tune", "evals"):
                return _error(400, f"Invalid value for 'purpose': {purpose!r}.", None, "purpose")
            tmp = self.dir / f".upload-{secrets.token_hex(6)}"
            with tmp.open("wb") as out:
                while chunk := await upload.read(CHUNK):
                    out.write(chunk)
            if purpose == "batch" and not (upload.filename or "").endswith(".jsonl"):
                tmp.unlink()
                return _error(
                    400, "Invalid file format for Batch API. Must be .jsonl", None, "file"
                )
            f = self._new_file(upload.filename or "upload", str(purpose), tmp)
        finally:
            await form.close()
        self.stats["files_uploaded"] += 1
        # A reply delayed after the file exists: a client killed here leaves an orphan file.
        await asyncio.sleep(self.config.files_upload_delay)
        return JSONResponse(f.public())

    async def file(self, request: Request) -> Response:
        f = self.files.get(request.path_params["file_id"])
        if f is None:
            return _error(404, f"No such File object: {request.path_params['file_id']}", None, "id")
        if request.method == "DELETE":
            self.files.pop(f.id)
            f.path.unlink(missing_ok=True)
            return JSONResponse({"id": f.id, "object": "file", "deleted": True})
        return JSONResponse(f.public())

    async def file_content(self, request: Request) -> Response:
        f = self.files.get(request.path_params["file_id"])
        if f is None:
            return _error(404, f"No such File object: {request.path_params['file_id']}", None, "id")
        delay = self.config.files_content_chunk_delay

        async def chunks() -> AsyncIterator[bytes]:
            with f.path.open("rb") as src:
                while chunk := src.read(CHUNK):
                    yield chunk
                    if delay:
                        await asyncio.sleep(delay)

        return StreamingResponse(
            chunks(),
            media_type="application/octet-stream",
            headers={
                "content-length": str(f.bytes),
                "x-request-id": "req_" + secrets.token_hex(16),
            },
        )

    async def list_files(self, request: Request) -> Response:
        data = [f.public() for f in sorted(self.files.values(), key=lambda f: -f.created_at)]
        return JSONResponse({"object": "list", "data": data, "has_more": False})

    # ------------------------------------------------------------------ batches
    async def create(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        problem = self._create_problem(body)
        if problem is not None:
            return problem
        f = self.files[body["input_file_id"]]
        now = time.time()
        keep = {b"authorization", b"api-key", b"host"}
        batch = SimBatch(
            "batch_" + secrets.token_hex(12),
            body["endpoint"],
            f.id,
            "24h",
            body.get("metadata"),
            now,
            now + self.config.batch_expire_seconds,
            [(k, v) for k, v in request.headers.raw if k.lower() in keep],
        )
        self.batches[batch.id] = batch
        self.stats["batches_created"] += 1
        batch.task = asyncio.get_running_loop().create_task(self._run(batch))
        # A reply delayed after the batch exists: the window a client must survive.
        await asyncio.sleep(self.config.batch_create_delay)
        return JSONResponse(batch.public())

    def _create_problem(self, body: Any) -> Response | None:
        """The error answer a create request earns, or None when it is well formed."""
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                return _error(
                    400,
                    f"Missing required parameter: '{name}'.",
                    "missing_required_parameter",
                    name,
                )
        if body["completion_window"] != "24h":
            return _error(
                400,
                "Invalid value for 'completion_window': only '24h' is supported.",
                "invalid_value",
                "completion_window",
            )
        if body["endpoint"] not in BATCH_ENDPOINTS:
            return _error(
                400,
                f"Invalid value for 'endpoint': {body['endpoint']!r} is not served by this simulator; use one of {list(BATCH_ENDPOINTS)}.",
                "invalid_value",
                "endpoint",
            )
        f = self.files.get(body["input_file_id"])
        if f is None:
            return _error(
                404, f"No such File object: {body['input_file_id']}", None, "input_file_id"
            )
        if f.purpose != "batch":
            return _error(
                400,
                "The input file must be uploaded with purpose 'batch'.",
                "invalid_value",
                "input_file_id",
            )
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or any(
                not isinstance(v, str) or len(k) > 64 or len(v) > 512 for k, v in metadata.items()
            )
        ):
            return _error(
                400,
                "Invalid 'metadata': at most 16 string pairs, keys up to 64 and values up to 512 characters.",
                "invalid_value",
                "metadata",
            )
        return None

    async def retrieve(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _error(
                404,
                f"No batch found with id '{request.path_params['batch_id']}'.",
                None,
                "batch_id",
            )
        return JSONResponse(batch.public())

    async def cancel(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _error(
                404,
                f"No batch found with id '{request.path_params['batch_id']}'.",
                None,
                "batch_id",
            )
        if batch.status in TERMINAL:
            return _error(
                409, f"Cannot cancel a batch with status '{batch.status}'.", "invalid_state"
            )
        if batch.status != "cancelling":
            batch.status = "cancelling"
            batch.times["cancelling"] = int(time.time())
        return JSONResponse(batch.public())

    async def list_batches(self, request: Request) -> Response:
        """Newest first, with `after` and `limit` (1..100, default 20) as the official API pages."""
        try:
            limit = int(request.query_params.get("limit", "20"))
        except ValueError:
            return _error(400, "Invalid 'limit': expected an integer.", "invalid_type", "limit")
        if not 1 <= limit <= 100:
            return _error(
                400,
                "Invalid 'limit': expected a value between 1 and 100.",
                "invalid_value",
                "limit",
            )
        ordered = sorted(self.batches.values(), key=lambda b: b.created, reverse=True)
        after = request.query_params.get("after")
        if after:
            ids = [b.id for b in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        page = ordered[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": [b.public() for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(ordered) > limit,
            }
        )

    # ------------------------------------------------------------------ the worker
    def _set(self, batch: SimBatch, status: str) -> None:
        batch.status = status
        batch.times[status] = int(time.time())

    async def _run(self, batch: SimBatch) -> None:
        try:
            await self._work(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("simulator bug while running %s", batch.id)
            batch.errors.append(
                {
                    "code": "server_error",
                    "line": None,
                    "message": "The batch failed inside the simulator.",
                    "param": None,
                }
            )
            self._set(batch, "failed")

    async def _work(self, batch: SimBatch) -> None:
        cfg = self.config
        await asyncio.sleep(cfg.batch_validating_seconds)
        if batch.status == "cancelling":
            self._set(batch, "cancelled")
            return
        lines = self._validate(batch)
        if lines is None:
            self._set(batch, "failed")
            return
        batch.total = len(lines)
        self._set(batch, "in_progress")
        out_tmp = self.dir / f".out-{batch.id}"
        err_tmp = self.dir / f".err-{batch.id}"
        with out_tmp.open("wb") as out, err_tmp.open("wb") as err:
            done = await self._execute_lines(batch, lines, out, err)
            final = "completed"
            if done < len(lines):
                final = "cancelled" if batch.status == "cancelling" else "expired"
                _write_unfinished(err, lines[done:], final)
        if final == "completed":
            self._set(batch, "finalizing")
            await asyncio.sleep(cfg.batch_finalizing_seconds)
        self._publish(batch, out_tmp, err_tmp)
        self._set(batch, final)

    async def _execute_lines(
        self, batch: SimBatch, lines: list[tuple[int, str]], out: IO[bytes], err: IO[bytes]
    ) -> int:
        """Run the lines in order until the batch is cancelled or expires; how many ran."""
        cfg = self.config
        done = 0
        with self.files[batch.input_file_id].path.open("rb") as src:
            for offset, _custom_id in lines:
                while cfg.batch_hold:
                    if batch.status != "in_progress" or time.time() >= batch.expires:
                        break
                    await asyncio.sleep(0.02)
                if batch.status == "cancelling" or time.time() >= batch.expires:
                    break
                if cfg.batch_seconds_per_line:
                    await asyncio.sleep(cfg.batch_seconds_per_line)
                src.seek(offset)
                line = json.loads(src.readline())
                status, body, request_id = await self._line(batch, line)
                record = {
                    "id": "batch_req_" + secrets.token_hex(12),
                    "custom_id": line["custom_id"],
                    "response": {"status_code": status, "request_id": request_id, "body": body},
                    "error": None,
                }
                target = out if 200 <= status < 300 else err
                target.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
                if 200 <= status < 300:
                    batch.completed += 1
                else:
                    batch.failed += 1
                done += 1
        return done

    def _publish(self, batch: SimBatch, out_tmp: Path, err_tmp: Path) -> None:
        """Turn the non-empty temp files into the batch's output and error files."""
        for tmp, attr, name in (
            (out_tmp, "output_file_id", "output"),
            (err_tmp, "error_file_id", "error"),
        ):
            if tmp.stat().st_size:
                f = self._new_file(f"{batch.id}_{name}.jsonl", "batch_output", tmp)
                setattr(batch, attr, f.id)
            else:
                tmp.unlink()

    def _validate(self, batch: SimBatch) -> list[tuple[int, str]] | None:
        """(offset, custom_id) of each request line, or None after recording why the batch
        fails. Offsets, not bodies: an input file of 200 MB is never held in memory."""
        cfg = self.config
        f = self.files.get(batch.input_file_id)

        def fail(
            code: str, message: str, line: int | None = None, param: str | None = None
        ) -> None:
            batch.errors.append({"code": code, "line": line, "message": message, "param": param})

        if f is None:
            fail("invalid_file", "The input file was deleted.")
            return None
        if f.bytes > cfg.batch_max_bytes:
            fail(
                "file_too_large",
                f"The input file is {f.bytes} bytes; the limit is {cfg.batch_max_bytes}.",
            )
            return None
        lines: list[tuple[int, str]] = []
        seen: set[str] = set()
        with f.path.open("rb") as src:
            offset = 0
            for number, raw in enumerate(src, 1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                custom_id = _check_line(raw, number, batch.endpoint, seen, fail)
                if custom_id is not None:
                    seen.add(custom_id)
                    lines.append((start, custom_id))
        if len(lines) > cfg.batch_max_lines:
            fail(
                "too_many_requests",
                f"The input file has {len(lines)} requests; the limit is {cfg.batch_max_lines}.",
            )
        if not lines and not batch.errors:
            fail("empty_file", "The input file has no requests.")
        return None if batch.errors else lines

    async def _line(self, batch: SimBatch, line: dict[str, Any]) -> tuple[int, Any, str]:
        self.stats["lines_run"] += 1
        request_id = "req_" + secrets.token_hex(16)
        body = line["body"]
        word = self.config.batch_error_word.strip().lower()
        if word and word in str(body.get("prompt", "")).lower():
            return (
                500,
                {
                    "error": {
                        "message": "The server had an error processing this request.",
                        "type": "server_error",
                        "param": None,
                        "code": "server_error",
                    }
                },
                request_id,
            )
        status, payload = await self.run_line(batch.endpoint, body, batch.headers)
        if 200 <= status < 300 and isinstance(payload, dict):
            self.stats["images_billed"] += len(payload.get("data") or [])
        return status, payload, request_id


async def asgi_line(
    app: Any, endpoint: str, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
) -> tuple[int, Any]:
    """Run one batch line through the simulator's own app, as a request it did not get over
    the network: the same parsing, moderation, rendering and billing as a live call. The
    scope flag tells the image handler to skip the live rate limits, latency and faults."""
    data = json.dumps(body).encode("utf-8")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": endpoint,
        "raw_path": endpoint.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            *headers,
        ],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
        "imagebatch.batch_line": True,
    }
    delivered = False
    never = asyncio.Event()
    status = 500
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": data, "more_body": False}
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    try:
        payload = json.loads(b"".join(chunks))
    except ValueError:
        payload = {
            "error": {
                "message": "The simulator returned a body that is not JSON.",
                "type": "server_error",
                "param": None,
                "code": "server_error",
            }
        }
        status = 500 if 200 <= status < 300 else status
    return status, payload


def routes(service: BatchService) -> list[Any]:
    from starlette.routing import Route

    return [
        Route("/v1/files", service.upload, methods=["POST"]),
        Route("/v1/files", service.list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", service.file, methods=["GET", "DELETE"]),
        Route("/v1/files/{file_id}/content", service.file_content, methods=["GET"]),
        Route("/v1/batches", service.create, methods=["POST"]),
        Route("/v1/batches", service.list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", service.retrieve, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", service.cancel, methods=["POST"]),
    ]


def _write_unfinished(err: IO[bytes], lines: list[tuple[int, str]], final: str) -> None:
    """Error-file lines for the requests a cancelled or expired batch never ran."""
    code = "batch_cancelled" if final == "cancelled" else "batch_expired"
    message = (
        "This request was not executed because the batch was cancelled."
        if final == "cancelled"
        else "This request could not be executed before the completion window expired."
    )
    for _offset, custom_id in lines:
        record = {
            "id": "batch_req_" + secrets.token_hex(12),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
        err.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")


def _check_line(
    raw: bytes,
    number: int,
    endpoint: str,
    seen: set[str],
    fail: Callable[[str, str, int | None, str | None], None],
) -> str | None:
    """One input line's problems, recorded through `fail`; its custom_id when it has one."""
    try:
        line = json.loads(raw)
    except ValueError:
        fail("invalid_json_line", "This line is not parseable as valid JSON.", number, None)
        return None
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        fail("missing_custom_id", "Each line needs a string 'custom_id'.", number, "custom_id")
        return None
    custom_id: str = line["custom_id"]
    if custom_id in seen:
        fail(
            "duplicate_custom_id",
            f"The custom_id for this request is a duplicate of another request: {custom_id}",
            number,
            "custom_id",
        )
    if line.get("method") != "POST":
        fail("invalid_method", "The only supported method is POST.", number, "method")
    if line.get("url") != endpoint:
        fail(
            "mismatched_url",
            f"The URL {line.get('url')!r} does not match the batch endpoint {endpoint}.",
            number,
            "url",
        )
    if not isinstance(line.get("body"), dict):
        fail("invalid_body", "Each line needs a JSON object 'body'.", number, "body")
    return custom_id
