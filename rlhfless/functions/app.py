"""One HTTP app factory for every stage function.

`POST /invoke` runs one request through the stage's handler (one at a time, like a Knative
revision with containerConcurrency=1), `GET /healthz` reports readiness, `GET /metrics` is
Prometheus. Repeated request ids are answered from a small cache, so a retry after a lost
response never redoes (or double-applies) work.

What callers can rely on: every endpoint but the probes needs the job's bearer token
(`functions.auth`, 401 otherwise); a body over the limit is refused (413) as soon as it
passes it, chunked or not; a caller that disconnects abandons its request
(`functions.cancel`); every reply is JSON (NaN/Inf are refused on the way in and never
sent out) and names no filesystem path (the full error goes to the function's log).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rlhfless.api.wire import REQUESTS
from rlhfless.functions.auth import BearerAuth
from rlhfless.functions.cancel import RequestCancelled, cancellable
from rlhfless.functions.metrics import FunctionMetrics

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
log = logging.getLogger("rlhfless.functions")


def process_started_at() -> float:
    """When the OS created this process (Linux /proc), else now: the start of billing."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        # /proc/stat's btime has whole-second precision; uptime is to the centisecond.
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


PROCESS_STARTED_AT = process_started_at()


class FunctionError(Exception):
    """A request the function refuses; becomes an HTTP error with a JSON message."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(message)


class StageHandler(Protocol):
    stage: str

    def handle(self, request: Any) -> BaseModel:
        """Serve one validated request (blocking; runs in a worker thread)."""

    def loaded_version(self) -> int | None:
        """The weights version in memory, if any."""


class _ResponseCache:
    """Bounded request-id → (body digest, encoded response) map."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[str, bytes]] = OrderedDict()

    def get(self, request_id: str, digest: str) -> bytes | None:
        hit = self._items.get(request_id)
        if hit is None:
            return None
        if hit[0] != digest:
            raise FunctionError(409, f"request id {request_id!r} was reused with another body")
        self._items.move_to_end(request_id)
        return hit[1]

    def put(self, request_id: str, digest: str, response: bytes) -> None:
        self._items[request_id] = (digest, response)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


# An absolute path of two or more components ("/data/jobs/x/store/v3/model.safetensors").
_PATH = re.compile(r"(?<![\w.~])(?:/[^\s/'\"`,;:()\[\]{}<>]+){2,}/?")


def redact_paths(message: str) -> str:
    """`message` with every absolute path cut to its last component."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], message)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error for the caller; paths stay in the function's log only."""
    redacted = redact_paths(message)
    if redacted != message:
        log.warning("HTTP %d: %s", status, message)
    return JSONResponse({"error": redacted}, status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


class _NotJSON(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON number")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` (a chunked body has no length to
    check up front: count while reading, never buffer past the limit)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body is read: the next message is the
    disconnect; servers send it once the connection drops)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(body)"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


def create_app(
    handler: StageHandler,
    *,
    token: str,
    cold_start_s: float | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_shutdown: Callable[[], None] | None = None,
) -> BearerAuth:
    """The stage's ASGI app; `token` is the job's bearer token (required, never empty)."""
    stage = handler.stage
    request_model = REQUESTS[stage]
    metrics = FunctionMetrics(stage)
    if cold_start_s is not None:
        metrics.cold_start.labels(stage).set(cold_start_s)
    cache = _ResponseCache()
    one_at_a_time = threading.Lock()

    def serve(body: bytes, cancel: threading.Event) -> bytes:
        digest = hashlib.sha256(body).hexdigest()
        with one_at_a_time:
            raw = json.loads(body, parse_constant=_no_constants)
            request = request_model.model_validate(raw)
            cached = cache.get(request.request_id, digest)
            if cached is not None:
                metrics.requests.labels(stage, "cached").inc()
                return cached
            if cancel.is_set():  # its caller left while it queued behind another request
                raise RequestCancelled("the caller disconnected before it was served")
            metrics.busy.labels(stage).set(1)
            started = time.perf_counter()
            try:
                with cancellable(cancel):
                    response = handler.handle(request).model_dump(mode="json")
            finally:
                metrics.busy.labels(stage).set(0)
            elapsed = time.perf_counter() - started
            response.setdefault("stats", {})["function_s"] = elapsed
            metrics.seconds.labels(stage).observe(elapsed)
            stats = response["stats"]
            metrics.tokens.labels(stage).inc(stats.get("tokens", 0))
            metrics.prefill_saved.labels(stage).inc(stats.get("prefill_tokens_saved", 0))
            version = handler.loaded_version()
            if version is not None:
                metrics.version.labels(stage).set(version)
            try:
                encoded = json.dumps(response, allow_nan=False).encode()
            except ValueError:
                raise FunctionError(500, f"the {stage} produced a non-finite number "
                                         "(NaN/Inf); nothing was returned") from None
            cache.put(request.request_id, digest, encoded)
            return encoded

    async def run(body: bytes, request: Request) -> bytes:
        """Serve in a worker thread; a client that disconnects cancels its request."""
        cancel = threading.Event()
        work = asyncio.ensure_future(run_in_threadpool(serve, body, cancel))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                cancel.set()
            return await work
        finally:
            if not work.done():  # this coroutine itself was cancelled (server stopping)
                cancel.set()
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone

    async def invoke(request: Request) -> Response:
        try:
            body = await _read_body(request, max_body_bytes)
        except _BodyTooLarge:
            metrics.requests.labels(stage, "invalid").inc()
            # The rest of the body is never read: close the connection after this reply.
            return _error(413, f"request body over {max_body_bytes} bytes",
                          headers={"Connection": "close"})
        try:
            result = await run(body, request)
        except (json.JSONDecodeError, _NotJSON, UnicodeDecodeError) as exc:
            metrics.requests.labels(stage, "invalid").inc()
            return _error(400, f"body is not JSON: {getattr(exc, 'msg', exc)}")
        except ValidationError as exc:
            metrics.requests.labels(stage, "invalid").inc()
            return _error(422, _validation_message(exc))
        except RequestCancelled:
            metrics.requests.labels(stage, "cancelled").inc()
            log.info("request abandoned: the caller disconnected")
            return _error(499, "the caller disconnected")
        except FunctionError as exc:
            metrics.requests.labels(stage, "refused").inc()
            return _error(exc.status, exc.message)
        except ValueError as exc:  # the request does not fit (e.g. longer than the model)
            metrics.requests.labels(stage, "invalid").inc()
            return _error(422, f"cannot serve this request: {exc}")
        except Exception as exc:  # noqa: BLE001 - report, don't drop the connection
            metrics.requests.labels(stage, "error").inc()
            log.exception("request failed")
            return _error(500, f"{type(exc).__name__}: {str(exc)[:500]} (see the function's "
                               "log)")
        metrics.requests.labels(stage, "ok").inc()
        return Response(result, media_type="application/json")

    async def healthz(_: Request) -> Response:
        return JSONResponse({
            "stage": stage,
            "ready": True,
            "weights_version": handler.loaded_version(),
            "started_at": PROCESS_STARTED_AT,
        })

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            on_shutdown()

    app = Starlette(lifespan=lifespan, routes=[
        Route("/invoke", invoke, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ])
    return BearerAuth(app, token)
