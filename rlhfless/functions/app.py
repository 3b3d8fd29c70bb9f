"""One HTTP app factory for every stage function.

`POST /invoke` runs one request through the stage's handler (one at a time, like a Knative
revision with containerConcurrency=1), `GET /healthz` reports readiness, `GET /metrics` is
Prometheus. Repeated request ids are answered from a small cache, so a retry after a lost
response never redoes (or double-applies) work.

Bodies are JSON or the binary codec (`rlhfless.api.codec`, by Content-Type); the reply uses
the request's format. A streaming stage (the actor) answers `/invoke` with length-prefixed
frames over a chunked response, the first one sent only once the request was accepted, so
a bad request is still a plain 4xx. While it streams, `POST /control` reaches the running
request (cut it, merge samples into it) without waiting for it. Every reply names the
instance that served it (header `x-rlhfless-instance`).

What callers can rely on: every endpoint but the probes needs the job's bearer token
(`functions.auth`, 401 otherwise), `/control` included; a body over the limit is refused
(413) as soon as it passes it, chunked or not; a caller that disconnects abandons its
request, streamed or not (`functions.cancel`: the engines stop at the next decode step); no
reply carries NaN/Inf (they are refused on the way in and a reply holding one is a JSON 500)
and no error names a filesystem path (the full error goes to the function's log).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rlhfless.api import codec
from rlhfless.api.wire import (
    CONTROLS,
    INSTANCE_ENV,
    INSTANCE_HEADER,
    REQUESTS,
    ErrorFrame,
)
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


def instance_name() -> str:
    """This instance's name: set by the local runtime, else the host name (on Kubernetes,
    the pod's name)."""
    return os.environ.get(INSTANCE_ENV) or socket.gethostname()


class FunctionError(Exception):
    """A request the function refuses; becomes an HTTP error with a JSON message (and a
    machine-readable `code` where a caller may recover from it)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        self.status = status
        self.message = message
        self.code = code
        super().__init__(message)


Emit = Callable[[BaseModel], None]


class StageHandler(Protocol):
    stage: str

    def handle(self, request: Any) -> BaseModel:
        """Serve one validated request (blocking; runs in a worker thread)."""

    def loaded_version(self) -> int | None:
        """The weights version in memory, if any."""


class StreamingHandler(StageHandler, Protocol):
    def stream(self, request: Any, emit: Emit) -> None:
        """Serve one request as a sequence of frames (blocking; a worker thread). The first
        frame means "accepted": raise before it to refuse the request. A caller that leaves
        makes `functions.cancel.check()` raise inside it."""

    def control(self, request: Any) -> BaseModel:
        """A control request for the running stream (never waits for it to finish)."""


class _ResponseCache:
    """Bounded request-id → (body digest, response) map."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[str, Any]] = OrderedDict()

    def get(self, request_id: str, digest: str) -> Any:
        hit = self._items.get(request_id)
        if hit is None:
            return None
        if hit[0] != digest:
            raise FunctionError(409, f"request id {request_id!r} was reused with another body")
        self._items.move_to_end(request_id)
        return hit[1]

    def put(self, request_id: str, digest: str, response: Any) -> None:
        self._items[request_id] = (digest, response)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


# An absolute path of two or more components ("/data/jobs/x/store/v3/model.safetensors").
_PATH = re.compile(r"(?<![\w.~])(?:/[^\s/'\"`,;:()\[\]{}<>]+){2,}/?")


def redact_paths(message: str) -> str:
    """`message` with every absolute path cut to its last component."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], message)


def _error(status: int, message: str, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error for the caller; paths stay in the function's log only."""
    redacted = redact_paths(message)
    if redacted != message:
        log.warning("HTTP %d: %s", status, message)
    body: dict[str, Any] = {"error": redacted}
    if code:
        body["code"] = code
    return JSONResponse(body, status_code=status,
                        headers={INSTANCE_HEADER: instance_name(), **(headers or {})})


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(body)"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


def _binary(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip() == codec.CONTENT_TYPE


class _NotJSON(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON number")


def _parse(body: bytes, binary: bool) -> Any:
    if binary:
        message = codec.decode(body)
        where = codec.non_finite(message)
        if where is not None:
            raise codec.CodecError(f"{where} is not a finite number")
        return message
    return json.loads(body, parse_constant=_no_constants)


def _finite_reply(stage: str, data: Any) -> None:
    """Refuse to send a NaN/Inf: a JSON reply could not carry it, and no caller wants it."""
    where = codec.non_finite(data)
    if where is not None:
        raise FunctionError(500, f"the {stage} produced a non-finite number (NaN/Inf) at "
                                 f"{where}; nothing was returned")


def _reply(data: dict[str, Any], binary: bool) -> Response:
    headers = {INSTANCE_HEADER: instance_name()}
    if binary:
        return Response(codec.encode(data), media_type=codec.CONTENT_TYPE, headers=headers)
    return JSONResponse(codec.to_json_compatible(data), headers=headers)


class _Refused(Exception):
    """Raised inside `serve` for a request-level failure, carrying its HTTP reply."""

    def __init__(self, response: Response, outcome: str):
        self.response = response
        self.outcome = outcome


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body is read: the next message is the
    disconnect; servers send it once the connection drops)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_gone(request: Request, work: asyncio.Future, cancel: threading.Event) -> Any:
    """Await `work`; if the caller disconnects first, set `cancel` (the handler raises
    RequestCancelled at its next check) and still wait for the work to wind down."""
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
    request_model = TypeAdapter(REQUESTS[stage])
    control_model = TypeAdapter(CONTROLS[stage]) if stage in CONTROLS else None
    streaming = callable(getattr(handler, "stream", None))
    metrics = FunctionMetrics(stage)
    if cold_start_s is not None:
        metrics.cold_start.labels(stage).set(cold_start_s)
    cache = _ResponseCache()
    one_at_a_time = threading.Lock()

    def observe(stats: dict[str, Any], elapsed: float) -> None:
        stats["function_s"] = elapsed
        metrics.seconds.labels(stage).observe(elapsed)
        metrics.tokens.labels(stage).inc(stats.get("tokens", 0))
        metrics.prefill_saved.labels(stage).inc(stats.get("prefill_tokens_saved", 0))
        version = handler.loaded_version()
        if version is not None:
            metrics.version.labels(stage).set(version)

    def serve(request: Any, digest: str, cancel: threading.Event) -> dict[str, Any]:
        with one_at_a_time:
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
                    response = handler.handle(request).model_dump()
            finally:
                metrics.busy.labels(stage).set(0)
            observe(response.setdefault("stats", {}), time.perf_counter() - started)
            _finite_reply(stage, response)
            cache.put(request.request_id, digest, response)
            return response

    async def read(request: Request) -> bytes:
        """The body, refused as soon as it passes the limit (a chunked body has no length
        to check up front: count while reading, never buffer past the limit)."""
        too_large = _Refused(_error(413, f"request body over {max_body_bytes} bytes",
                                    # the rest of the body is never read: close after this
                                    headers={"Connection": "close"}), "invalid")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def validate(adapter: TypeAdapter, body: bytes, binary: bool) -> Any:
        try:
            return adapter.validate_python(_parse(body, binary))
        except (json.JSONDecodeError, _NotJSON, UnicodeDecodeError) as exc:
            raise _Refused(_error(400, f"body is not JSON: {getattr(exc, 'msg', exc)}"),
                           "invalid") from None
        except codec.CodecError as exc:
            raise _Refused(_error(400, f"body is not a valid message: {exc}"),
                           "invalid") from None
        except ValidationError as exc:
            raise _Refused(_error(422, _validation_message(exc)), "invalid") from None

    def refusal(exc: BaseException) -> _Refused:
        if isinstance(exc, RequestCancelled):
            log.info("request abandoned: the caller disconnected")
            return _Refused(_error(499, "the caller disconnected"), "cancelled")
        if isinstance(exc, FunctionError):
            return _Refused(_error(exc.status, exc.message, exc.code), "refused")
        if isinstance(exc, ValueError):  # the request does not fit (e.g. longer than the model)
            return _Refused(_error(422, f"cannot serve this request: {exc}"), "invalid")
        log.error("request failed", exc_info=exc)
        return _Refused(_error(500, f"{type(exc).__name__}: {str(exc)[:500]} (see the "
                                    "function's log)"), "error")

    async def invoke(request: Request) -> Response:
        try:
            body = await read(request)
            binary = _binary(request)
            parsed = validate(request_model, body, binary)
            digest = hashlib.sha256(body).hexdigest()
            if streaming:
                return await stream(request, parsed, digest)
            cancel = threading.Event()
            work = asyncio.ensure_future(run_in_threadpool(serve, parsed, digest, cancel))
            try:
                result = await _unless_gone(request, work, cancel)
            except Exception as exc:  # noqa: BLE001 - report, don't drop the connection
                raise refusal(exc) from None
        except _Refused as refused:
            metrics.requests.labels(stage, refused.outcome).inc()
            return refused.response
        metrics.requests.labels(stage, "ok").inc()
        return _reply(result, binary)

    async def stream(http: Request, request: Any, digest: str) -> Response:
        """Frames from the handler's thread, through a queue, into a chunked response."""
        try:
            cached = cache.get(request.request_id, digest)
        except FunctionError as exc:
            raise refusal(exc) from None
        headers = {INSTANCE_HEADER: instance_name()}
        if cached is not None:
            metrics.requests.labels(stage, "cached").inc()

            async def replay() -> AsyncIterator[bytes]:
                for chunk in cached:
                    yield chunk

            return StreamingResponse(replay(), media_type=codec.FRAMES_TYPE, headers=headers)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        frames: list[bytes] = []
        final_stats: dict[str, Any] = {}
        cancel = threading.Event()

        def emit(message: BaseModel) -> None:
            data = message.model_dump()
            _finite_reply(stage, data)
            encoded = codec.frame(data)
            frames.append(encoded)
            stats = getattr(message, "stats", None)
            if isinstance(stats, dict):  # the end (or cut) frame: the whole run's account
                final_stats.clear()
                final_stats.update(stats)
            loop.call_soon_threadsafe(queue.put_nowait, encoded)

        def work() -> None:
            with one_at_a_time:
                outcome = "ok"
                metrics.busy.labels(stage).set(1)
                started = time.perf_counter()
                try:
                    if cancel.is_set():  # its caller left while it queued
                        raise RequestCancelled("the caller disconnected before it was served")
                    with cancellable(cancel):
                        handler.stream(request, emit)  # type: ignore[attr-defined]
                except BaseException as exc:  # noqa: BLE001 - the stream reports it
                    outcome = "cancelled" if isinstance(exc, RequestCancelled) else "error"
                    loop.call_soon_threadsafe(queue.put_nowait, exc)
                finally:
                    metrics.busy.labels(stage).set(0)
                    # tokens, prefill saved and the weights version, as a plain request's
                    observe(dict(final_stats), time.perf_counter() - started)
                if outcome == "ok":
                    cache.put(request.request_id, digest, list(frames))
                if frames:  # accepted; a refusal before the first frame is counted by invoke
                    metrics.requests.labels(stage, outcome).inc()
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = asyncio.ensure_future(run_in_threadpool(work))
        # Until the first frame, the caller may still leave (queued, or loading a model).
        first_frame = asyncio.ensure_future(queue.get())
        try:
            first = await _unless_gone(http, first_frame, cancel)
        finally:
            if cancel.is_set() and not first_frame.done():
                first_frame.cancel()
        if isinstance(first, BaseException) or first is None:
            with contextlib.suppress(BaseException):
                await worker
            if first is None:
                first = RuntimeError("the stream ended before it started")
            raise refusal(first)

        async def frames_out() -> AsyncIterator[bytes]:
            item: bytes | BaseException | None = first
            try:
                while item is not None:
                    if isinstance(item, BaseException):
                        status = getattr(item, "status", 500)
                        if not isinstance(item, FunctionError | RequestCancelled):
                            log.error("stream failed: %s", item, exc_info=item)
                        message = redact_paths(getattr(item, "message", None) or str(item))
                        yield codec.frame(ErrorFrame(status=status, message=message)
                                          .model_dump())
                    else:
                        yield item
                    item = await queue.get()
            finally:
                if not worker.done():  # the caller went away mid-stream: stop the work
                    cancel.set()
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(worker)

        return StreamingResponse(frames_out(), media_type=codec.FRAMES_TYPE, headers=headers)

    async def control(request: Request) -> Response:
        if control_model is None:
            return _error(404, f"the {stage} function takes no control requests")
        try:
            body = await read(request)
            binary = _binary(request)
            parsed = validate(control_model, body, binary)
            try:
                reply = await run_in_threadpool(handler.control, parsed)  # type: ignore
            except Exception as exc:  # noqa: BLE001
                raise refusal(exc) from None
        except _Refused as refused:
            return refused.response
        return _reply(reply.model_dump(), binary)

    async def healthz(_: Request) -> Response:
        return JSONResponse({
            "stage": stage,
            "ready": True,
            "weights_version": handler.loaded_version(),
            "started_at": PROCESS_STARTED_AT,
            "instance": instance_name(),
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
        Route("/control", control, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ])
    return BearerAuth(app, token)
