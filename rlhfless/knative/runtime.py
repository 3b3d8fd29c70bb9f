"""The Runtime protocol on Knative: one Service per stage, created by the operator.

- `scale(stage, n)` sets the revision template's min-scale to `n` (prewarm; 0 lets Knative
  scale to zero after the keep-alive). Knative reads scale bounds from the revision
  template, so each change rolls a new revision; calls that change nothing patch nothing.
Every call carries the job's bearer token (the job's Secret, mounted into the driver's pod):
the functions answer 401 without it, on `/invoke` and `/control` alike.

- `invoke(stage, payload)` POSTs to `<Service URL>/invoke`. With containerConcurrency 1,
  N parallel invokes become N pods; the activator holds requests while pods cold-start.
  Connection errors and 502/503/504 (activator, overloaded queue-proxy) are retried; the
  functions answer a repeated request id from their cache, so a retry never double-applies.
- `invoke_stream(stage, payload)` is the same POST with a streamed reply (the actor's
  frames); the function's first frame names its pod (Kubernetes sets a pod's hostname to its
  name), which is how the driver knows which instance runs which rollout.
- `invoke_instance(stage, pod, payload)` calls that pod directly, bypassing the activator
  and the queue-proxy (whose containerConcurrency=1 would hold a control request behind the
  running rollout): `http://<status.podIP>:8080/control`. The pod IP comes from the pods
  this runtime already lists for metering (`list pods` with the Service label, the same RBAC
  rule; no new verb). The driver must reach pod IPs on the user port: the job's
  NetworkPolicy admits the job's driver pod on that port (`knative.isolation`); a mesh in
  front of the functions must allow it too.
- `release_instance` does nothing immediate on Knative: the cut pod is idle once its stream
  ends and the autoscaler reclaims it after its window (patching min-scale would roll a new
  revision in the middle of the rollout).
- `meter()` returns pod lifetimes (GPUs × seconds alive) from a background pod poller
  (label serving.knative.dev/service), refreshed after invocations too. A pod that vanishes
  is billed up to when it was first seen gone: never less than it used. Busy spans are
  attributed to pods by the `x-rlhfless-instance` header every function reply carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from rlhfless.api import codec
from rlhfless.api.spec import RLHFJob
from rlhfless.api.wire import bearer
from rlhfless.knative.kube import Kube, parse_time
from rlhfless.knative.services import (
    AUTOSCALING,
    FUNCTION_PORT,
    GPU_RESOURCE,
    LABEL_KSVC,
    FunctionSettings,
    scale_patch,
    service_name,
)
from rlhfless.runtime.base import InstanceUsage, InvocationError, Payload, StreamBroken
from rlhfless.runtime.transport import (
    decode_body,
    encode_body,
    error_of,
    frames,
    post_control,
    served_by,
)

RETRY_STATUS = (502, 503, 504)
log = logging.getLogger(__name__)


@dataclass
class _Pod:
    stage: str
    name: str
    gpus: int
    started_at: float
    ready_at: float | None
    ended_at: float | None = None
    ip: str | None = None
    busy: list[tuple[float, float]] = field(default_factory=list)

    def usage(self) -> InstanceUsage:
        ready = self.ready_at if self.ready_at is not None else self.started_at
        return InstanceUsage(self.stage, self.name, self.gpus, self.started_at, self.ended_at,
                             max(0.0, ready - self.started_at), busy=tuple(self.busy))


def _pod_gpus(pod: dict[str, Any]) -> int:
    total = 0
    for container in pod.get("spec", {}).get("containers", []) or []:
        limits = (container.get("resources") or {}).get("limits") or {}
        total += int(limits.get(GPU_RESOURCE, 0) or 0)
    return total


def _pod_ready_at(pod: dict[str, Any]) -> float | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") == "True":
            return parse_time(cond.get("lastTransitionTime"))
    return None


def _pod_finished_at(pod: dict[str, Any]) -> float | None:
    if pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
        return None
    ends = [parse_time(((s.get("state") or {}).get("terminated") or {}).get("finishedAt"))
            for s in pod.get("status", {}).get("containerStatuses") or []]
    known = [e for e in ends if e is not None]
    return max(known) if known else time.time()


def service_ready(service: dict[str, Any] | None) -> bool:
    for cond in (service or {}).get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


class KnativeRuntime:
    """Runtime protocol over the job's Knative Services. Use as an async context manager."""

    def __init__(
        self,
        job: RLHFJob,
        *,
        namespace: str,
        kube: Kube,
        token: str,
        settings: FunctionSettings | None = None,
        http: httpx.AsyncClient | None = None,
        meter_interval_s: float = 5.0,
        retries: int = 4,
        retry_backoff_s: float = 1.0,
        pod_port: int = FUNCTION_PORT,
    ):
        self.job = job
        self.namespace = namespace
        self.kube = kube
        self.settings = settings or FunctionSettings()
        self.stages = job.spec.stages.deployed
        self.meter_interval_s = meter_interval_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.pod_port = pod_port  # the user container's port (FUNCTION_PORT in every Service)
        timeout = httpx.Timeout(self.settings.timeout_s + 30.0, connect=10.0)
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._auth = bearer(token)  # the job's token: functions answer 401 without it
        self._own_http = http is None
        self._urls: dict[str, str] = {}
        self._min_scale: dict[str, int] = {}
        self._pods: dict[str, _Pod] = {}
        self._refreshed: dict[str, float] = {}
        self._poller: asyncio.Task[None] | None = None

    def _service(self, stage: str) -> str:
        if stage not in self.stages:
            raise InvocationError(stage, f"no such stage for this job (stages: "
                                         f"{', '.join(self.stages)})")
        return service_name(self.job.metadata.name, stage)

    # -- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> KnativeRuntime:
        self._poller = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._own_http:
            await self._http.aclose()

    # -- the Runtime protocol ------------------------------------------------------------
    async def scale(self, stage: str, n: int) -> None:
        """Keep at least `n` warm pods of `stage` (a new revision when the bound changes)."""
        n = max(0, int(n))
        if n == 0 and stage not in self.stages:
            return  # e.g. the critic of a GRPO job: nothing deployed, nothing to release
        name = self._service(stage)
        if self._min_scale.get(stage) == n:
            return
        if stage not in self._min_scale:
            current = await self.kube.get_service(self.namespace, name)
            annotations = ((current or {}).get("spec", {}).get("template", {})
                           .get("metadata", {}).get("annotations") or {})
            if annotations.get(AUTOSCALING + "min-scale", "0") == str(n):
                self._min_scale[stage] = n
                return
        await self.kube.patch_service(self.namespace, name,
                                      scale_patch(self.job, stage, n, self.settings))
        self._min_scale[stage] = n

    async def _attempt_url(self, stage: str, attempt: int) -> str:
        """The URL for try number `attempt`: a retry backs off exponentially first and
        reads the Service's URL again instead of the cached one."""
        if attempt:
            await asyncio.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
        return await self.url(stage, refresh=attempt > 0)

    async def invoke(self, stage: str, payload: Payload) -> Payload:
        body, headers = encode_body(payload)
        headers = {**headers, **self._auth}
        last = "no attempt made"
        for attempt in range(self.retries):
            url = await self._attempt_url(stage, attempt)
            started = time.time()
            try:
                response = await self._http.post(f"{url}/invoke", content=body, headers=headers)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__} from {url}"
                continue
            finally:
                await self._refresh_soon(stage)
            if response.status_code in RETRY_STATUS:
                last = f"HTTP {response.status_code} from {url}"
                continue
            await self._busy(stage, served_by(response), started)
            if response.status_code >= 400:
                message, code = error_of(response)
                raise InvocationError(stage, message, response.status_code, code)
            return decode_body(response)
        raise InvocationError(stage, f"gave up after {self.retries} attempts: {last}")

    async def invoke_stream(self, stage: str,
                            payload: Payload) -> AsyncIterator[tuple[str, Payload]]:
        body, headers = encode_body(payload)
        headers = {**headers, **self._auth}
        last = "no attempt made"
        for attempt in range(self.retries):
            url = await self._attempt_url(stage, attempt)
            started, instance = time.time(), None
            try:
                async with self._http.stream("POST", f"{url}/invoke", content=body,
                                             headers=headers) as response:
                    instance = served_by(response)
                    if response.status_code in RETRY_STATUS:
                        last = f"HTTP {response.status_code} from {url}"
                        continue
                    if response.status_code >= 400:
                        await response.aread()
                        message, code = error_of(response)
                        raise InvocationError(stage, message, response.status_code, code)
                    async for frame in frames(response):
                        if frame.get("type") == "hello":
                            instance = frame.get("instance") or instance
                        yield instance or "", frame
                return
            except (httpx.TransportError, codec.CodecError) as exc:
                last = f"{type(exc).__name__} from {url}"
                if instance is not None:  # frames went out: the caller decides what to redo
                    raise StreamBroken(stage, f"stream from {instance} broke: {last}") from None
            finally:
                await self._busy(stage, instance, started)
                await self._refresh_soon(stage)
        raise InvocationError(stage, f"gave up after {self.retries} attempts: {last}")

    async def invoke_instance(self, stage: str, instance: str, payload: Payload) -> Payload:
        address = await self.pod_address(stage, instance)
        return await post_control(self._http, stage, address, f"pod {instance} at {address}",
                                  payload, self._auth)

    async def release_instance(self, stage: str, instance: str) -> None:
        """Nothing to do at once: the idle pod goes when the autoscaler's window passes."""

    def meter(self) -> list[InstanceUsage]:
        return [pod.usage() for pod in self._pods.values()]

    # -- instance addressing -------------------------------------------------------------
    async def pod_address(self, stage: str, instance: str) -> str:
        """`http://<pod IP>:<user port>` of a running pod of `stage`, by pod name."""
        pod = self._by_name(stage, instance)
        if pod is None or pod.ip is None:
            await self.refresh_usage((stage,))
            pod = self._by_name(stage, instance)
        if pod is None or pod.ip is None or pod.ended_at is not None:
            raise InvocationError(stage, f"no running pod {instance!r} with an IP", 404)
        return f"http://{pod.ip}:{self.pod_port}"

    def _by_name(self, stage: str, name: str) -> _Pod | None:
        return next((p for p in self._pods.values() if p.name == name and p.stage == stage),
                    None)

    async def _busy(self, stage: str, instance: str | None, started: float) -> None:
        """Book a request's span on the pod that served it; a pod not metered yet (it
        started since the last refresh) is looked up first, so no span is dropped."""
        ended = time.time()
        if instance is None:
            return
        pod = self._by_name(stage, instance)
        if pod is None:
            await self._refresh_soon(stage, force=True)
            pod = self._by_name(stage, instance)
        if pod is not None:
            pod.busy.append((started, ended))

    # -- Knative extras ------------------------------------------------------------------
    async def url(self, stage: str, refresh: bool = False) -> str:
        """The Service URL from its status, or its cluster-local DNS name until it has one."""
        name = self._service(stage)
        if refresh or stage not in self._urls:
            service = await self.kube.get_service(self.namespace, name)
            url = (service or {}).get("status", {}).get("url")
            if not url:
                return f"http://{name}.{self.namespace}.svc.cluster.local"
            self._urls[stage] = str(url).rstrip("/")
        return self._urls[stage]

    async def ready(self, stage: str) -> bool:
        return service_ready(await self.kube.get_service(self.namespace, self._service(stage)))

    async def wait_ready(self, stages: tuple[str, ...] | None = None, timeout_s: float = 600.0,
                         poll_s: float = 2.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(stages or self.stages)
        while pending:
            pending = [s for s in pending if not await self.ready(s)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise InvocationError(pending[0], f"Knative Services not ready in {timeout_s}s: "
                                                  f"{', '.join(pending)}")
            await asyncio.sleep(poll_s)

    async def refresh_usage(self, stages: tuple[str, ...] | None = None) -> None:
        """Re-read pod lifetimes of `stages` (all by default)."""
        now = time.time()
        for stage in stages or self.stages:
            pods = await self.kube.list_pods(self.namespace, {LABEL_KSVC: self._service(stage)})
            seen = set()
            for pod in pods:
                meta = pod.get("metadata", {})
                key = meta.get("uid") or meta.get("name")
                seen.add(key)
                started = parse_time(pod.get("status", {}).get("startTime")) or parse_time(
                    meta.get("creationTimestamp")) or now
                record = self._pods.get(key)
                if record is None:
                    record = self._pods[key] = _Pod(stage, meta.get("name", key),
                                                    _pod_gpus(pod), started, None)
                record.ready_at = record.ready_at or _pod_ready_at(pod)
                record.ended_at = record.ended_at or _pod_finished_at(pod)
                record.ip = pod.get("status", {}).get("podIP") or record.ip
            for key, record in self._pods.items():
                if record.stage == stage and key not in seen and record.ended_at is None:
                    record.ended_at = now
            self._refreshed[stage] = now

    async def _refresh_soon(self, stage: str, force: bool = False) -> None:
        if force or time.time() - self._refreshed.get(stage, 0.0) > 1.0:
            try:
                await self.refresh_usage((stage,))
            except Exception as exc:  # metering must never fail a request
                log.warning("pod metering of %s failed: %s", stage, exc)

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh_usage()
            except Exception as exc:
                log.warning("pod metering failed: %s", exc)
            await asyncio.sleep(self.meter_interval_s)
