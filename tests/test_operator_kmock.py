"""The real kopf operator against an in-process Kubernetes API (kmock).

The runtime and driver are injected: a fake driver with the real driver's contract (resume
from the run dir's checkpoint, stop after the current step, report each step) keeps these
tests to seconds; `test_operator_real_driver.py` runs the real driver and local runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kmock_cluster import JOBS, KSVC, Cluster, emulated_cluster

from rlhfless.api.wire import JOB_ENV
from rlhfless.driver.records import StepRecord
from rlhfless.knative.services import LABEL_STAGE
from rlhfless.operator.config import JobContext, OperatorConfig
from rlhfless.operator.metrics import OperatorMetrics
from rlhfless.operator.rbac import NOT_SEEN_IN_TESTS, OPERATOR_RULES
from rlhfless.runtime.base import InstanceUsage
from rlhfless.store import Checkpoint, load_checkpoint, save_checkpoint

TINY = {"model": {"source": "tiny", "tiny": {"nLayer": 1, "nEmbd": 16, "nHead": 2,
                                             "nPositions": 64}},
        "algorithm": {"klBeta": 0.01},  # a KL term: the reference stage is deployed
        "reward": {"name": "target_char", "args": {"char": "5"}},
        "generation": {"maxNewTokens": 8}}

# Every request the operator makes in this module, for the RBAC check at the end.
RECORDED: set[tuple[str, str, str]] = set()


@dataclass
class Trace:
    """What fake drivers and runtimes did, across operator restarts."""

    completed: list[tuple[str, int]] = field(default_factory=list)  # (job, step) recorded
    started: list[tuple[str, int]] = field(default_factory=list)  # (job, step) begun
    scales: list[tuple[str, str, int]] = field(default_factory=list)  # (job, stage, n)
    runtimes_open: int = 0
    run_dirs: set[Path] = field(default_factory=set)
    gpu_seconds: list[float] = field(default_factory=list)


class FakeRuntime:
    def __init__(self, ctx: JobContext, trace: Trace):
        self.ctx, self.trace = ctx, trace
        self.t0 = time.time()

    async def __aenter__(self) -> FakeRuntime:
        self.trace.runtimes_open += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.trace.runtimes_open -= 1

    async def scale(self, stage: str, n: int) -> None:
        self.trace.scales.append((self.ctx.name, stage, n))

    async def invoke(self, stage: str, payload: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("the fake driver never invokes")

    def meter(self) -> list[InstanceUsage]:
        return [InstanceUsage("actor", "actor-0", 1, self.t0, None, 0.5)]

    async def close(self) -> None:
        pass


class FakeDriver:
    """The driver's contract without the ML: checkpoint after each step, resume from it."""

    def __init__(self, ctx: JobContext, runtime: FakeRuntime, trace: Trace, step_s: float):
        self.ctx, self.runtime, self.trace, self.step_s = ctx, runtime, trace, step_s
        self.work: Any = None
        trace.run_dirs.add(ctx.run_dir)

    async def run(self, stop: asyncio.Event | None = None, on_step: Any = None) -> int:
        cp = load_checkpoint(self.ctx.run_dir) or Checkpoint()
        steps = self.ctx.job.spec.steps
        while cp.step < steps and not (stop is not None and stop.is_set()):
            step = cp.step + 1
            self.trace.started.append((self.ctx.name, step))
            await asyncio.sleep(self.step_s)
            if self.work is not None:
                self.trace.gpu_seconds.append(await self.work(step))
            cp = Checkpoint(step=step, weights_version=step,
                            gpu_seconds_total=cp.gpu_seconds_total + 1.5)
            save_checkpoint(self.ctx.run_dir, cp)
            self.trace.completed.append((self.ctx.name, step))
            record = StepRecord(step, {"timing_s/step": self.step_s,
                                       "cost/gpu_seconds/actor": 1.0,
                                       "cost/gpu_seconds/trainer": 0.5,
                                       "idle_ratio/actor": 0.25, "sched/actors": 2.0},
                                reward_mean=step / 10, gpu_seconds_total=cp.gpu_seconds_total,
                                weights_version=step,
                                checkpoint=str(self.ctx.run_dir / "checkpoint.json"))
            if on_step is not None:
                await on_step(record)
        for stage in self.ctx.job.spec.stages.deployed:
            await self.runtime.scale(stage, 0)
        return cp.step


def fake_hooks(cluster: Cluster, tmp_path: Path, trace: Trace, step_s: float = 0.2,
               metrics: OperatorMetrics | None = None, **config: Any):
    cfg = OperatorConfig(data_dir=tmp_path, watch_interval_s=0.05, retry_backoff_s=0.2,
                         **config)
    return cluster.hooks(
        config=cfg,
        runtime_factory=lambda ctx: FakeRuntime(ctx, trace),
        driver_factory=lambda ctx, rt: FakeDriver(ctx, rt, trace, step_s),
        metrics=metrics or OperatorMetrics(),
    )


def condition(cluster: Cluster, name: str, type_: str) -> dict[str, Any]:
    for c in cluster.status(name).get("conditions") or []:
        if c["type"] == type_:
            return c
    return {}


@contextlib.asynccontextmanager
async def running(tmp_path: Path, trace: Trace, **kw: Any):
    async with emulated_cluster() as cluster:
        try:
            async with cluster.operator(fake_hooks(cluster, tmp_path, trace, **kw)):
                yield cluster
        finally:
            RECORDED.update(cluster.api_calls())


async def test_job_creates_owned_services_and_status_follows_steps(tmp_path: Path) -> None:
    trace = Trace()
    metrics = OperatorMetrics()
    async with running(tmp_path, trace, metrics=metrics) as cluster:
        job = await cluster.create_job("demo", {**TINY, "steps": 3})
        uid = job["metadata"]["uid"]
        seen_steps: list[int] = []

        def progressed() -> bool:
            step = cluster.status("demo").get("step")
            if step is not None and (not seen_steps or seen_steps[-1] != step):
                seen_steps.append(step)
            return cluster.phase("demo") == "Succeeded"

        await cluster.wait_for(progressed, interval=0.01, what="Succeeded")

        services = {s["metadata"]["name"]: s for s in cluster.services()}
        assert set(services) == {"demo-actor", "demo-reward", "demo-learner"}
        for name, svc in services.items():
            owner = svc["metadata"]["ownerReferences"][0]
            assert (owner["kind"], owner["name"], owner["uid"]) == ("RLHFJob", "demo", uid)
            assert owner["controller"] is True
            template = svc["spec"]["template"]
            assert template["metadata"]["labels"][LABEL_STAGE] == name.removeprefix("demo-")
            env = {e["name"]: e["value"] for e in template["spec"]["containers"][0]["env"]}
            assert '"name":"demo"' in env[JOB_ENV]

    status = cluster.status("demo")
    # Steps were reported one by one, in order, and never repeated.
    assert seen_steps == sorted(set(seen_steps)) and seen_steps[-1] == 3
    assert status["step"] == 3 and status["weightsVersion"] == 3
    assert status["reward"] == pytest.approx(0.3)
    assert status["costGpuSeconds"] == pytest.approx(4.5)
    assert status["checkpoint"].endswith("checkpoint.json")
    assert status["observedGeneration"] == 1
    assert condition(cluster, "demo", "Complete")["status"] == "True"
    assert condition(cluster, "demo", "Ready")["reason"] == "ServicesCreated"
    assert all(c["lastTransitionTime"] for c in status["conditions"])
    assert trace.completed == [("demo", 1), ("demo", 2), ("demo", 3)]
    # The run dir lives under the data dir, keyed by namespace, name and uid.
    assert trace.run_dirs == {tmp_path / "jobs" / "default" / f"demo-{uid[:8]}" / "run"}
    # Prometheus: per-step counters and gauges.
    assert metrics.steps.labels("default", "demo")._value.get() == 3
    assert metrics.gpu_seconds.labels("default", "demo", "actor")._value.get() == 3.0
    assert metrics.reward.labels("default", "demo")._value.get() == pytest.approx(0.3)
    assert metrics.jobs.labels("Succeeded")._value.get() == 1


INVALID_SPECS: dict[str, tuple[dict[str, Any], str]] = {
    "bad-algorithm": ({"algorithm": {"name": "dpo"}}, "spec.algorithm.name"),
    "bad-clip": ({"algorithm": {"clipEps": 0}}, "spec.algorithm.clipEps"),
    "ppo-grpo-adv": ({"algorithm": {"name": "ppo", "advantage": "grpo"}}, "spec.algorithm"),
    "unknown-field": ({"algorithm": {"clipEPS": 0.2}}, "spec.algorithm.clipEPS"),
    "bad-steps": ({"steps": 0}, "spec.steps"),
    "actors-over-max": ({"scheduling": {"actors": 8, "maxActors": 2}}, "spec.scheduling"),
    "bad-reward": ({"reward": {"name": "nope"}}, "spec.reward"),
    "hf-no-path": ({"model": {"source": "hf"}}, "spec.model"),
    "bad-heads": ({"model": {"tiny": {"nEmbd": 30, "nHead": 4}}}, "spec.model.tiny"),
    "bad-gpus": ({"resources": {"actor": {"gpus": -1}}}, "spec.resources.actor.gpus"),
    "bad-top-p": ({"generation": {"topP": 1.5}}, "spec.generation.topP"),
    "jsonl-no-path": ({"dataset": {"kind": "jsonl"}}, "spec.dataset"),
    "tokens-too-long": ({"generation": {"maxNewTokens": 600}}, "spec"),
    "a-name-far-too-long-for-knative-revisions-x": ({}, "metadata.name"),
}


async def test_invalid_specs_are_reported_and_create_nothing(tmp_path: Path) -> None:
    trace = Trace()
    async with running(tmp_path, trace) as cluster:
        for name, (spec, _) in INVALID_SPECS.items():
            await cluster.create_job(name, spec)

        def all_reported() -> bool:
            return all(condition(cluster, n, "Ready").get("reason") == "InvalidSpec"
                       for n in INVALID_SPECS)

        await cluster.wait_for(all_reported, what="InvalidSpec on every job")
        await asyncio.sleep(0.3)  # give a wrong operator time to create something anyway
        assert cluster.services() == []
        assert trace.started == []
        for name, (_, field_path) in INVALID_SPECS.items():
            ready = condition(cluster, name, "Ready")
            assert ready["status"] == "False"
            assert field_path in ready["message"], (name, ready["message"])
            assert cluster.phase(name) == "Failed"

        # Fixing the spec starts the job.
        await cluster.patch_job_spec("bad-steps", {"steps": 1})
        await cluster.wait_for(lambda: cluster.phase("bad-steps") == "Succeeded",
                               what="fixed job succeeds")
        assert condition(cluster, "bad-steps", "Ready")["status"] == "True"
        assert condition(cluster, "bad-steps", "Ready")["observedGeneration"] == 2
        assert {s["metadata"]["name"] for s in cluster.services()} == {
            f"bad-steps-{s}" for s in ("actor", "reward", "learner")}


async def test_suspend_stops_after_current_step_and_resume_continues(tmp_path: Path) -> None:
    trace = Trace()
    async with running(tmp_path, trace, step_s=0.3) as cluster:
        await cluster.create_job("sus", {**TINY, "steps": 4,
                                         "algorithm": {"name": "ppo", "klBeta": 0.01}})
        await cluster.wait_for(lambda: cluster.status("sus").get("step", 0) >= 1, what="step 1")
        await cluster.patch_job_spec("sus", {"suspend": True})
        await cluster.wait_for(lambda: cluster.phase("sus") == "Suspended", what="Suspended")
        suspended_at = cluster.status("sus")["step"]
        assert suspended_at >= 1
        # The step in flight when suspend arrived was finished, not abandoned.
        assert trace.started == trace.completed
        assert condition(cluster, "sus", "Suspended")["status"] == "True"
        assert condition(cluster, "sus", "Running")["reason"] == "SuspendRequested"
        # Every stage of the PPO job (the learner holds its critic) was scaled to zero.
        zeroed = {stage for job, stage, n in trace.scales if job == "sus" and n == 0}
        assert {"actor", "reward", "learner"} <= zeroed
        await asyncio.sleep(0.8)  # suspended really means no more steps
        assert cluster.status("sus")["step"] == suspended_at
        assert len(trace.started) == suspended_at
        assert trace.runtimes_open == 0

        await cluster.patch_job_spec("sus", {"suspend": False})
        await cluster.wait_for(lambda: cluster.phase("sus") == "Succeeded", what="Succeeded")
        assert condition(cluster, "sus", "Suspended")["status"] == "False"
    assert [s for j, s in trace.completed if j == "sus"] == [1, 2, 3, 4]
    assert {s["metadata"]["name"] for s in cluster.services()} == {
        "sus-actor", "sus-reward", "sus-learner"}  # PPO's critic lives in the learner


async def test_changing_an_immutable_field_is_refused_until_reverted(tmp_path: Path) -> None:
    """Without CEL on the API server, the operator itself refuses a model swap."""
    trace = Trace()
    async with running(tmp_path, trace, step_s=0.2) as cluster:
        await cluster.create_job("imm", {**TINY, "steps": 6})
        await cluster.wait_for(lambda: cluster.status("imm").get("step", 0) >= 1, what="step 1")
        await cluster.patch_job_spec("imm", {"model": {"tiny": {"nLayer": 2}}})
        await cluster.wait_for(lambda: condition(cluster, "imm", "Ready").get("reason")
                               == "InvalidSpec", what="InvalidSpec")
        assert "spec.model: is immutable" in condition(cluster, "imm", "Ready")["message"]
        held_at = len(trace.started)
        await asyncio.sleep(0.6)
        assert len(trace.started) == held_at and trace.started == trace.completed
        await cluster.patch_job_spec("imm", {"model": {"tiny": {"nLayer": 1}}})
        await cluster.wait_for(lambda: cluster.phase("imm") == "Succeeded", what="Succeeded")
    assert [s for _, s in trace.completed] == [1, 2, 3, 4, 5, 6]


async def test_operator_restart_resumes_without_repeating_a_step(tmp_path: Path) -> None:
    trace = Trace()
    async with emulated_cluster() as cluster:
        async with cluster.operator(fake_hooks(cluster, tmp_path, trace, step_s=0.3)):
            await cluster.create_job("rs", {**TINY, "steps": 6})
            await cluster.wait_for(lambda: cluster.status("rs").get("step", 0) >= 2,
                                   what="step 2")
        # The operator is gone; the step in flight (if any) was abandoned, not recorded.
        stopped_at = cluster.status("rs")["step"]
        assert cluster.phase("rs") == "Running" and trace.runtimes_open == 0
        restarts_from = len(trace.started)
        async with cluster.operator(fake_hooks(cluster, tmp_path, trace, step_s=0.3)):
            await cluster.wait_for(lambda: cluster.phase("rs") == "Succeeded", what="Succeeded")
        RECORDED.update(cluster.api_calls())
    assert [s for _, s in trace.completed] == [1, 2, 3, 4, 5, 6]
    # The new operator started right after the last recorded step.
    assert trace.started[restarts_from][1] == stopped_at + 1
    assert len(trace.run_dirs) == 1


async def test_delete_stops_the_job_and_children_are_garbage_collected(tmp_path: Path) -> None:
    trace = Trace()
    async with running(tmp_path, trace, step_s=0.3) as cluster:
        await cluster.create_job("gone", {**TINY, "steps": 50})
        await cluster.wait_for(lambda: cluster.status("gone").get("step", 0) >= 1,
                               what="running")
        assert len(cluster.services()) == 3
        await cluster.delete_job("gone")
        # kopf stops the daemon, then releases its finalizer: the job disappears.
        await cluster.wait_for(lambda: cluster.job("gone") is None, what="job deleted")
        assert trace.runtimes_open == 0
        steps_at_delete = len(trace.started)
        await asyncio.sleep(0.6)
        assert len(trace.started) == steps_at_delete  # nothing runs for a deleted job
        # The cluster's garbage collector removes what the job owned, and only that.
        collected = cluster.collect_garbage()
        assert sorted(name for _, name in collected) == [
            "gone-actor", "gone-learner", "gone-reward"]
        assert cluster.services() == []


async def test_driver_failure_is_reported_and_retried(tmp_path: Path) -> None:
    trace = Trace()
    attempts = []

    class FlakyDriver(FakeDriver):
        async def run(self, stop: Any = None, on_step: Any = None) -> int:
            attempts.append(time.time())
            if len(attempts) == 1:
                raise RuntimeError("actor function crashed")
            return await super().run(stop, on_step)

    async with emulated_cluster() as cluster:
        hooks = fake_hooks(cluster, tmp_path, trace)
        hooks.driver_factory = lambda ctx, rt: FlakyDriver(ctx, rt, trace, 0.05)
        async with cluster.operator(hooks):
            await cluster.create_job("flaky", {**TINY, "steps": 2})
            await cluster.wait_for(lambda: condition(cluster, "flaky", "Ready").get("reason")
                                   == "DriverError", what="DriverError")
            assert "actor function crashed" in condition(cluster, "flaky", "Ready")["message"]
            await cluster.wait_for(lambda: cluster.phase("flaky") == "Succeeded",
                                   what="retry succeeds")
        RECORDED.update(cluster.api_calls())
    assert len(attempts) == 2 and attempts[1] - attempts[0] >= 0.2  # backed off


class InvokingDriver(FakeDriver):
    """Each step uses the runtime as the real driver does: prewarm actors, invoke every
    stage, release actors, bill from the meter."""

    async def run(self, stop: asyncio.Event | None = None, on_step: Any = None) -> int:
        rt = self.runtime
        t0 = time.time()

        async def step_work(step: int) -> float:
            await rt.scale("actor", 2)
            # Prewarm means two actor pods running before the requests go out: wait for
            # Knative (emulated) to run them, as the metered pods show.
            deadline = time.monotonic() + 60
            while sum(u.stage == "actor" and u.ended_at is None for u in rt.meter()) < 2:
                assert time.monotonic() < deadline, "the second actor pod never ran"
                await asyncio.sleep(0.05)
            await asyncio.gather(*(rt.invoke("actor", {"request_id": f"s{step}-a{i}"})
                                   for i in range(2)))
            for stage in ("reward", "learner"):
                await rt.invoke(stage, {"request_id": f"s{step}-{stage}"})
            await rt.scale("actor", 0)
            return sum(u.gpu_seconds(time.time()) for u in rt.meter()
                       if u.started_at >= t0 - 5)

        self.work = step_work
        return await super().run(stop, on_step)


async def test_operator_drives_knative_services_through_the_knative_runtime(
        tmp_path: Path) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    invoked: list[str] = []

    async def invoke(request: web.Request) -> web.Response:
        invoked.append((await request.json())["request_id"])
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/invoke", invoke)
    server = TestServer(app)
    await server.start_server()
    trace = Trace()
    try:
        async with emulated_cluster() as cluster:
            knative = asyncio.create_task(
                cluster.emulate_knative(str(server.make_url("")).rstrip("/")))
            hooks = cluster.hooks(
                config=OperatorConfig(data_dir=tmp_path, watch_interval_s=0.05,
                                      meter_interval_s=0.1),
                driver_factory=lambda ctx, rt: InvokingDriver(ctx, rt, trace, 0.0),
                metrics=OperatorMetrics())
            async with cluster.operator(hooks):
                await cluster.create_job("kn", {**TINY, "steps": 2,
                                                "resources": {"actor": {"gpus": 2}}})
                await cluster.wait_for(lambda: cluster.phase("kn") == "Succeeded",
                                       what="Succeeded")
            knative.cancel()
            RECORDED.update(cluster.api_calls())
            # Prewarm rolled the actor Service to min-scale 2, and back to 0 after.
            actor = cluster.get(KSVC, "kn-actor")
            ann = actor["spec"]["template"]["metadata"]["annotations"]
            assert ann["autoscaling.knative.dev/min-scale"] == "0"
            pods = {p["metadata"]["name"] for p in cluster.list("v1/pods")}
            assert "kn-actor-00001-deployment-1" in pods  # the second, prewarmed actor
    finally:
        await server.close()
    assert sorted(invoked) == sorted(
        f"s{s}-{x}" for s in (1, 2) for x in ("a0", "a1", "reward", "learner"))
    assert [s for _, s in trace.completed] == [1, 2]
    assert trace.gpu_seconds and trace.gpu_seconds[-1] > 0  # metered from the pods


async def test_persistent_failure_waits_for_a_spec_change(tmp_path: Path) -> None:
    trace = Trace()
    attempts: list[int] = []

    class BrokenDriver(FakeDriver):
        async def run(self, stop: Any = None, on_step: Any = None) -> int:
            attempts.append(self.ctx.job.spec.steps)
            raise RuntimeError("image cannot start")

    async with emulated_cluster() as cluster:
        hooks = fake_hooks(cluster, tmp_path, trace, max_retries=1)
        hooks.driver_factory = lambda ctx, rt: BrokenDriver(ctx, rt, trace, 0.05)
        async with cluster.operator(hooks):
            await cluster.create_job("broken", {**TINY, "steps": 2})
            await cluster.wait_for(lambda: len(attempts) == 2, what="two attempts")
            await cluster.wait_for(lambda: "retrying" not in condition(
                cluster, "broken", "Ready").get("message", "retrying"), what="gave up")
            await asyncio.sleep(0.6)
            assert attempts == [2, 2]  # first try + one retry, then it waits
            assert cluster.phase("broken") == "Failed"
            await cluster.patch_job_spec("broken", {"steps": 3})
            await cluster.wait_for(lambda: len(attempts) == 3, what="retry after the change")
        RECORDED.update(cluster.api_calls())
    assert attempts[-1] == 3


def test_operator_calls_stay_within_its_rbac_rules() -> None:
    """Runs after the tests above (file order): what they recorded is what the operator
    needs; the Helm ClusterRole must grant exactly OPERATOR_RULES."""
    if not RECORDED:
        pytest.skip("run with the operator tests of this module")
    assert RECORDED <= OPERATOR_RULES, RECORDED - OPERATOR_RULES
    assert OPERATOR_RULES - RECORDED <= NOT_SEEN_IN_TESTS, OPERATOR_RULES - RECORDED
    # The essentials were exercised for real.
    assert {("rlhfless.io", "rlhfjobs", "watch"), ("rlhfless.io", "rlhfjobs/status", "patch"),
            ("serving.knative.dev", "services", "create")} <= RECORDED
    assert JOBS and KSVC  # the emulated resources this module used
