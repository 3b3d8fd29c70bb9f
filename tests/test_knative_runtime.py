"""KnativeRuntime against an in-process Kubernetes API (kmock) and a local function server."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kmock_cluster import KSVC, PODS, Cluster, emulated_cluster
from knative_webhook import check_webhook_rules

from rlhfless.api import codec
from rlhfless.api.spec import parse_spec
from rlhfless.api.wire import INSTANCE_HEADER
from rlhfless.knative.kube import Kube
from rlhfless.knative.runtime import KnativeRuntime
from rlhfless.knative.services import (
    AUTOSCALING,
    FunctionSettings,
    build_services,
)
from rlhfless.runtime.base import InvocationError, Runtime, StreamBroken

TOKEN = "job-token"
JOB = parse_spec({"scheduling": {"actors": 2, "maxActors": 3}, "reward": {"name": "format"},
                  "resources": {"actor": {"gpus": 2}}}, "kn")


class FunctionServer:
    """A stand-in stage function: answers /invoke, can fail the first requests."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_with: list[int] = []

    async def invoke(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        body = await request.json()
        self.requests.append(body)
        if self.fail_with:
            status = self.fail_with.pop(0)
            return web.json_response({"error": f"failed with {status}"}, status=status)
        return web.json_response({"echo": body, "stage": request.headers.get("Host")})


class StreamingFunction:
    """A stand-in actor pod: streams frames naming itself, takes /control requests."""

    def __init__(self, pod: str) -> None:
        self.pod = pod
        self.controls: list[dict[str, Any]] = []
        self.auth: list[str] = []  # the Authorization header of every call, stream or control
        self.break_after_first = False

    async def invoke(self, request: web.Request) -> web.StreamResponse:
        self.auth.append(request.headers.get("Authorization", ""))
        body = codec.decode(await request.read())
        response = web.StreamResponse(headers={INSTANCE_HEADER: self.pod,
                                               "content-type": codec.FRAMES_TYPE})
        await response.prepare(request)
        await response.write(codec.frame({"type": "hello", "instance": self.pod}))
        if self.break_after_first:
            request.transport.close()  # the pod dies mid-stream
            return response
        await response.write(codec.frame({"type": "samples", "echo": body["ids"]}))
        await response.write(codec.frame({"type": "end", "stats": {}}))
        await response.write_eof()
        return response

    async def control(self, request: web.Request) -> web.Response:
        self.auth.append(request.headers.get("Authorization", ""))
        self.controls.append(await request.json())
        return web.json_response({"accepted": True}, headers={INSTANCE_HEADER: self.pod})


@pytest.fixture
async def function() -> AsyncIterator[tuple[FunctionServer, str]]:
    fn = FunctionServer()
    app = web.Application()
    app.router.add_post("/invoke", fn.invoke)
    server = TestServer(app)
    await server.start_server()
    try:
        yield fn, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with emulated_cluster() as c:
        for svc in build_services(JOB, namespace="default", uid="1234abcd-uid"):
            await c.create_object(KSVC, svc)
        yield c


@contextlib.asynccontextmanager
async def knative(cluster: Cluster, **kw: Any) -> AsyncIterator[KnativeRuntime]:
    async with await cluster.api_client() as api, KnativeRuntime(
            JOB, namespace="default", kube=Kube(api), token=kw.pop("token", TOKEN),
            retry_backoff_s=0.01, **kw) as runtime:
        yield runtime


def set_url(cluster: Cluster, stage: str, url: str | None, ready: bool = True) -> None:
    svc = cluster.get(KSVC, f"kn-{stage}")
    assert svc is not None
    status: dict[str, Any] = {"conditions": [{"type": "Ready",
                                              "status": "True" if ready else "False"}]}
    if url:
        status["url"] = url
    cluster.set_object(KSVC, {**svc, "status": status})


async def test_implements_the_runtime_protocol(cluster: Cluster) -> None:
    async with knative(cluster) as runtime:
        assert isinstance(runtime, Runtime)


async def test_invoke_posts_to_the_service_url_and_retries_transient_errors(
        cluster: Cluster, function: tuple[FunctionServer, str]) -> None:
    fn, url = function
    set_url(cluster, "actor", url)
    async with knative(cluster) as runtime:
        reply = await runtime.invoke("actor", {"request_id": "r1", "x": 1})
        assert reply["echo"] == {"request_id": "r1", "x": 1}
        # The activator's 503 and a gateway 502 are retried with the same body.
        fn.fail_with = [503, 502]
        reply = await runtime.invoke("actor", {"request_id": "r2"})
        assert reply["echo"]["request_id"] == "r2"
        assert [r["request_id"] for r in fn.requests] == ["r1", "r2", "r2", "r2"]
        # A refusal is not retried and keeps its status and message.
        fn.fail_with = [422]
        with pytest.raises(InvocationError) as err:
            await runtime.invoke("actor", {"request_id": "r3"})
        assert err.value.status == 422 and "failed with 422" in str(err.value)
        assert len(fn.requests) == 5
        # Persistent unavailability gives up after the configured attempts.
        fn.fail_with = [503] * 10
        with pytest.raises(InvocationError, match="gave up after 4 attempts"):
            await runtime.invoke("actor", {"request_id": "r4"})
    # Without the job's token a function refuses the call (401), and that is not retried.
    async with knative(cluster, token="stolen") as runtime:
        with pytest.raises(InvocationError) as err:
            await runtime.invoke("actor", {"request_id": "r5"})
        assert err.value.status == 401


async def test_url_comes_from_status_or_cluster_local_dns(cluster: Cluster) -> None:
    async with knative(cluster) as runtime:
        assert await runtime.url("reward") == "http://kn-reward.default.svc.cluster.local"
        set_url(cluster, "reward", "http://kn-reward.default.example/")
        assert await runtime.url("reward", refresh=True) == "http://kn-reward.default.example"
        with pytest.raises(InvocationError, match="no such stage"):
            await runtime.url("critic")  # fused into the learner: no Service of its own


async def test_invoke_unreachable_service_fails_after_retries(cluster: Cluster) -> None:
    set_url(cluster, "learner", "http://127.0.0.1:9")  # discard port: connection refused
    async with knative(cluster, retries=2) as runtime:
        with pytest.raises(InvocationError, match="gave up after 2 attempts: ConnectError"):
            await runtime.invoke("learner", {"request_id": "t"})


def template_annotations(cluster: Cluster, stage: str) -> dict[str, str]:
    svc = cluster.get(KSVC, f"kn-{stage}")
    assert svc is not None
    return svc["spec"]["template"]["metadata"]["annotations"]


def patches(cluster: Cluster) -> int:
    return sum(1 for r in cluster.emulator if str(r.method.value).upper() == "PATCH")


@pytest.mark.parametrize("zero_initial", [False, True])
async def test_scale_patches_scale_bounds_only_when_they_change(
        cluster: Cluster, zero_initial: bool) -> None:
    settings = FunctionSettings(allow_zero_initial_scale=zero_initial)
    async with knative(cluster, settings=settings) as runtime:
        before = patches(cluster)
        await runtime.scale("actor", 0)  # already 0 in the manifest: nothing to roll
        assert patches(cluster) == before
        await runtime.scale("actor", 2)
        ann = template_annotations(cluster, "actor")
        assert (ann[AUTOSCALING + "min-scale"], ann[AUTOSCALING + "max-scale"],
                ann[AUTOSCALING + "initial-scale"]) == ("2", "3", "2")
        await runtime.scale("actor", 5)  # above maxActors: the bound follows
        ann = template_annotations(cluster, "actor")
        assert (ann[AUTOSCALING + "min-scale"], ann[AUTOSCALING + "max-scale"]) == ("5", "5")
        count = patches(cluster)
        await runtime.scale("actor", 5)
        assert patches(cluster) == count
        await runtime.scale("actor", 0)
        ann = template_annotations(cluster, "actor")
        assert ann[AUTOSCALING + "min-scale"] == "0"
        assert ann[AUTOSCALING + "initial-scale"] == ("0" if zero_initial else "1")
        svc = cluster.get(KSVC, "kn-actor")
        assert check_webhook_rules(svc, allow_zero_initial_scale=zero_initial) == []
        await runtime.scale("critic", 0)  # not a stage of the job: releasing it is a no-op
        with pytest.raises(InvocationError):
            await runtime.scale("critic", 1)


def pod(name: str, service: str, gpus: int, start: float, ready_after: float | None,
        phase: str = "Running") -> dict[str, Any]:
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    conditions = [] if ready_after is None else [
        {"type": "Ready", "status": "True", "lastTransitionTime": iso(start + ready_after)}]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}",
                     "creationTimestamp": iso(start),
                     "labels": {"serving.knative.dev/service": service}},
        "spec": {"containers": [
            {"name": "user-container", "image": "x",
             "resources": {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}},
            {"name": "queue-proxy", "image": "q"}]},
        "status": {"phase": phase, "startTime": iso(start), "conditions": conditions},
    }


async def test_a_request_served_by_a_pod_not_metered_yet_is_still_booked(
        cluster: Cluster) -> None:
    fn = StreamingFunction("kn-actor-00001-deployment-new")
    app = web.Application()
    app.router.add_post("/invoke", fn.invoke)
    server = TestServer(app)
    await server.start_server()
    try:
        set_url(cluster, "actor", str(server.make_url("")).rstrip("/"))
        async with knative(cluster, meter_interval_s=3600) as runtime:
            await runtime.refresh_usage(("actor",))  # metered just now: no pod yet
            assert runtime.meter() == []
            # A pod starts and serves at once, well within the metering throttle.
            await cluster.create_object(PODS, pod(fn.pod, "kn-actor", 1,
                                                  float(int(time.time()) - 1), 1))
            got = [inst async for inst, _ in runtime.invoke_stream(
                "actor", {"request_id": "r", "ids": np.arange(2, dtype=np.int32)})]
            assert set(got) == {fn.pod}
            [usage] = runtime.meter()
            assert usage.instance == fn.pod and len(usage.busy) == 1
    finally:
        await server.close()


async def test_meter_reads_pod_lifetimes_by_service_label(cluster: Cluster) -> None:
    start = float(int(time.time()) - 100)
    await cluster.create_object(PODS, pod("a1", "kn-actor", 2, start, 12))
    await cluster.create_object(PODS, pod("a2", "kn-actor", 2, start + 50, None))
    await cluster.create_object(PODS, pod("r1", "kn-reward", 0, start, 3))
    await cluster.create_object(PODS, pod("x1", "other-service", 8, start, 1))
    async with knative(cluster, meter_interval_s=3600) as runtime:
        await runtime.refresh_usage()
        usage = {u.instance: u for u in runtime.meter()}
        assert set(usage) == {"a1", "a2", "r1"}  # another service's pod is not ours
        a1 = usage["a1"]
        assert (a1.stage, a1.gpus, a1.started_at, a1.ended_at) == ("actor", 2, start, None)
        assert a1.cold_start_s == pytest.approx(12)
        assert usage["a2"].cold_start_s == 0  # not ready yet
        assert usage["r1"].gpus == 0
        now = time.time()
        assert a1.gpu_seconds(now) == pytest.approx(2 * (now - start), abs=0.1)
        # Scaled down: the pod vanishes and is billed up to when that was seen.
        cluster.emulator.objects[(PODS, "default", "a1")].delete()
        before = time.time()
        await runtime.refresh_usage(("actor",))
        ended = {u.instance: u for u in runtime.meter()}["a1"].ended_at
        assert ended is not None and before <= ended <= time.time()


async def test_readiness_comes_from_service_conditions(cluster: Cluster) -> None:
    async with knative(cluster) as runtime:
        assert not await runtime.ready("actor")
        set_url(cluster, "actor", "http://a", ready=True)
        set_url(cluster, "reward", "http://r", ready=False)
        assert await runtime.ready("actor")
        assert not await runtime.ready("reward")
        with pytest.raises(InvocationError, match="not ready"):
            await runtime.wait_ready(("actor", "reward"), timeout_s=0.2, poll_s=0.05)
        set_url(cluster, "reward", "http://r", ready=True)
        await runtime.wait_ready(("actor", "reward"), timeout_s=1, poll_s=0.05)


async def test_streams_name_their_pod_and_control_requests_reach_that_pod_directly(
        cluster: Cluster) -> None:
    fn = StreamingFunction("kn-actor-00001-deployment-abc")
    app = web.Application()
    app.router.add_post("/invoke", fn.invoke)
    app.router.add_post("/control", fn.control)
    server = TestServer(app)
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        set_url(cluster, "actor", url)
        start = float(int(time.time()) - 10)
        record = pod(fn.pod, "kn-actor", 2, start, 1)
        record["status"]["podIP"] = "127.0.0.1"  # the pod's own address, not the Service's
        await cluster.create_object(PODS, record)
        async with knative(cluster, pod_port=server.port) as runtime:
            got = [(inst, frame) async for inst, frame in runtime.invoke_stream(
                "actor", {"request_id": "r", "ids": np.arange(3, dtype=np.int32)})]
            assert [f["type"] for _, f in got] == ["hello", "samples", "end"]
            assert {inst for inst, _ in got} == {fn.pod}
            assert got[1][1]["echo"].tolist() == [0, 1, 2]  # arrays went raw both ways
            reply = await runtime.invoke_instance("actor", fn.pod, {"op": "cut",
                                                                    "request_id": "c"})
            assert reply == {"accepted": True} and fn.controls == [{"op": "cut",
                                                                    "request_id": "c"}]
            busy = {u.instance: u.busy for u in runtime.meter()}[fn.pod]
            assert len(busy) == 1 and busy[0][1] >= busy[0][0]
            with pytest.raises(InvocationError, match="no running pod"):
                await runtime.invoke_instance("actor", "kn-actor-gone", {"request_id": "c"})
            fn.break_after_first = True
            with pytest.raises(StreamBroken):
                async for _ in runtime.invoke_stream("actor", {"request_id": "r2",
                                                               "ids": np.arange(2)}):
                    pass
            await runtime.release_instance("actor", fn.pod)  # nothing to do on Knative
        # Streams and pod-addressed control calls carry the job's token (the pod checks it
        # as every function does; the call bypasses the activator, not the token).
        assert len(fn.auth) == 3 and set(fn.auth) == {f"Bearer {TOKEN}"}
    finally:
        await server.close()
