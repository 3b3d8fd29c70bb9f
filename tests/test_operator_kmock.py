"""The real kopf operator against an in-process Kubernetes API (kmock), with driver pods.

The operator creates each job's children and a driver `batch/v1` Job; the emulated Job
controller (tests/kmock_cluster.py) runs that Job's pod in-process: the real pod entry
(`driver_pod.drive`, publishing progress through the driver's own identity) around a fake
driver with the real driver's contract (resume from the run dir's checkpoint, stop after
the current step, report each step), so these tests take seconds.
`test_operator_real_driver.py` runs the real driver and local runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from driver_pods import in_process
from kmock_cluster import (
    BATCH_JOBS,
    CONFIGMAPS,
    DRIVER_AGENT,
    KSVC,
    NETPOL,
    ROLEBINDINGS,
    ROLES,
    SECRETS,
    SERVICEACCOUNTS,
    Cluster,
    emulated_cluster,
)

from rlhfless.api.wire import JOB_ENV
from rlhfless.cost import Ledger
from rlhfless.driver.records import StepRecord
from rlhfless.knative.driver import DRIVER_RULES
from rlhfless.knative.kube import SPEC_HASH
from rlhfless.knative.pods import FunctionSettings
from rlhfless.knative.services import AUTOSCALING, LABEL_STAGE
from rlhfless.operator.config import OperatorConfig
from rlhfless.operator.metrics import OperatorMetrics
from rlhfless.operator.rbac import NAMESPACED_RULES, NOT_SEEN_IN_TESTS, OPERATOR_RULES
from rlhfless.runtime.base import InstanceUsage
from rlhfless.store import Checkpoint, load_checkpoint, save_checkpoint

TINY = {"model": {"source": "tiny", "tiny": {"nLayer": 1, "nEmbd": 16, "nHead": 2,
                                             "nPositions": 64}},
        "algorithm": {"klBeta": 0.01},  # a KL term: the learner holds the reference
        "reward": {"name": "target_char", "args": {"char": "5"}},
        "generation": {"maxNewTokens": 8}}
CHILD_KINDS = (SECRETS, NETPOL, SERVICEACCOUNTS, ROLES, ROLEBINDINGS, CONFIGMAPS, KSVC,
               BATCH_JOBS)

# Every request the operator (and the driver pods) made in this module, for the RBAC check.
RECORDED: set[tuple[str, str, str]] = set()
RECORDED_BY_DRIVERS: set[tuple[str, str, str]] = set()


@dataclass
class Trace:
    """What fake drivers and runtimes did, across pods and operator restarts."""

    completed: list[tuple[str, int]] = field(default_factory=list)  # (job, step) recorded
    started: list[tuple[str, int]] = field(default_factory=list)  # (job, step) begun
    scales: list[tuple[str, str, int]] = field(default_factory=list)  # (job, stage, n)
    runtimes_open: int = 0
    run_dirs: set[Path] = field(default_factory=set)
    store_dirs: set[Path] = field(default_factory=set)
    gpu_seconds: list[float] = field(default_factory=list)
    failures_left: int = 0  # the next runs that raise before stepping


class FakeRuntime:
    def __init__(self, job: Any, trace: Trace):
        self.job, self.trace = job, trace
        self.t0 = time.time()

    async def __aenter__(self) -> FakeRuntime:
        self.trace.runtimes_open += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.trace.runtimes_open -= 1

    async def scale(self, stage: str, n: int) -> None:
        self.trace.scales.append((self.job.metadata.name, stage, n))

    async def invoke(self, stage: str, payload: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("the fake driver never invokes")

    def meter(self) -> list[InstanceUsage]:
        return [InstanceUsage("actor", "actor-0", 1, self.t0, None, 0.5)]

    async def close(self) -> None:
        pass


class FakeDriver:
    """The driver's contract without the ML: checkpoint after each step, resume from it."""

    def __init__(self, job: Any, runtime: Any, run_dir: Path, store_dir: Path, trace: Trace,
                 step_s: float):
        self.job, self.runtime, self.trace, self.step_s = job, runtime, trace, step_s
        self.run_dir = run_dir
        self.work: Any = None
        cp = load_checkpoint(run_dir)
        self.saved_step = cp.step if cp else 0
        self.ledger = Ledger()  # no budget in these jobs: the spend is only reported
        trace.run_dirs.add(run_dir)
        trace.store_dirs.add(store_dir)

    def prepare(self) -> str | None:
        return None

    async def run(self, stop: asyncio.Event | None = None, on_step: Any = None) -> int:
        name = self.job.metadata.name
        if self.trace.failures_left > 0:
            self.trace.failures_left -= 1
            raise RuntimeError("actor function crashed")
        cp = load_checkpoint(self.run_dir) or Checkpoint()
        steps = self.job.spec.steps
        while cp.step < steps and not (stop is not None and stop.is_set()):
            step = cp.step + 1
            self.trace.started.append((name, step))
            await asyncio.sleep(self.step_s)
            if self.work is not None:
                self.trace.gpu_seconds.append(await self.work(step))
            cp = Checkpoint(step=step, weights_version=step,
                            gpu_seconds_total=cp.gpu_seconds_total + 1.5)
            save_checkpoint(self.run_dir, cp)
            self.saved_step = step
            self.trace.completed.append((name, step))
            record = StepRecord(step, {"timing_s/step": self.step_s,
                                       "cost/gpu_seconds/actor": 1.0,
                                       "cost/gpu_seconds/learner": 0.5,
                                       "idle_ratio/actor": 0.25, "sched/actors": 2.0,
                                       "not/exported": 7.0},
                                reward_mean=step / 10, gpu_seconds_total=cp.gpu_seconds_total,
                                weights_version=step,
                                checkpoint=str(self.run_dir / "checkpoint.json"))
            self.ledger.add(record.metrics)
            if on_step is not None:
                await on_step(record)
        for stage in self.job.spec.stages.deployed:
            await self.runtime.scale(stage, 0)
        return cp.step


def fake_hooks(cluster: Cluster, metrics: OperatorMetrics | None = None, **config: Any):
    cfg = OperatorConfig(watch_interval_s=0.02, progress_interval_s=0.03, retry_backoff_s=0.2,
                         **config)
    return cluster.hooks(config=cfg, metrics=metrics or OperatorMetrics())


def fake_pods(cluster: Cluster, tmp_path: Path, trace: Trace, step_s: float = 0.2,
              driver_cls: type[FakeDriver] = FakeDriver) -> Any:
    return in_process(
        cluster, tmp_path,
        lambda job, ns, kube, token, run_dir, store: FakeRuntime(job, trace),
        lambda job, rt, run_dir, store: driver_cls(job, rt, run_dir, store, trace, step_s))


def condition(cluster: Cluster, name: str, type_: str) -> dict[str, Any]:
    for c in cluster.status(name).get("conditions") or []:
        if c["type"] == type_:
            return c
    return {}


def children(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    return {kind: cluster.list(kind) for kind in CHILD_KINDS}


@contextlib.asynccontextmanager
async def running(tmp_path: Path, trace: Trace, step_s: float = 0.2,
                  driver_cls: type[FakeDriver] = FakeDriver, **kw: Any):
    async with emulated_cluster() as cluster:
        try:
            async with cluster.operator(fake_hooks(cluster, **kw)), cluster.job_controller(
                    fake_pods(cluster, tmp_path, trace, step_s, driver_cls)) as jobs:
                cluster.jobs = jobs  # type: ignore[attr-defined]
                yield cluster
        finally:
            RECORDED.update(cluster.api_calls())
            RECORDED_BY_DRIVERS.update(cluster.api_calls(DRIVER_AGENT))


async def test_job_creates_owned_children_and_status_follows_steps(tmp_path: Path) -> None:
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
        owned = children(cluster)
        services = {s["metadata"]["name"]: s for s in owned[KSVC]}
        assert set(services) == {"demo-actor", "demo-reward", "demo-learner"}
        for kind, objects in owned.items():
            assert objects, f"no {kind}"
            for obj in objects:
                owner = obj["metadata"]["ownerReferences"][0]
                assert (owner["kind"], owner["name"], owner["uid"]) == ("RLHFJob", "demo", uid)
                assert owner["controller"] is True
        for name, svc in services.items():
            template = svc["spec"]["template"]
            assert template["metadata"]["labels"][LABEL_STAGE] == name.removeprefix("demo-")
            env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
            assert '"name":"demo"' in env[JOB_ENV]
        [driver] = owned[BATCH_JOBS]
        assert driver["metadata"]["name"] == "demo-driver"
        assert driver["spec"]["template"]["spec"]["serviceAccountName"] == "demo-driver"

    status = cluster.status("demo")
    # Steps were reported one by one, in order, and never repeated.
    assert seen_steps == sorted(set(seen_steps)) and seen_steps[-1] == 3
    assert status["step"] == 3 and status["weightsVersion"] == 3
    assert status["reward"] == pytest.approx(0.3)
    assert status["costGpuSeconds"] == pytest.approx(4.5)
    assert status["checkpoint"] == f"jobs/default/demo-{uid[:8]}/run/checkpoint.json"
    assert status["observedGeneration"] == 1
    assert condition(cluster, "demo", "Complete")["status"] == "True"
    assert condition(cluster, "demo", "Ready")["reason"] == "ServicesCreated"
    assert all(c["lastTransitionTime"] for c in status["conditions"])
    assert trace.completed == [("demo", 1), ("demo", 2), ("demo", 3)]
    # The pod mounts only its job's folder: run/ and store/ under jobs/<ns>/<name>-<uid8>/.
    home = tmp_path / "jobs" / "default" / f"demo-{uid[:8]}"
    assert trace.run_dirs == {home / "run"} and trace.store_dirs == {home / "store"}
    # Prometheus: per-step counters and gauges, from the progress the driver published.
    assert metrics.steps.labels("default", "demo")._value.get() == 3
    assert metrics.gpu_seconds.labels("default", "demo", "actor")._value.get() == 3.0
    assert metrics.reward.labels("default", "demo")._value.get() == pytest.approx(0.3)
    assert metrics.actors_alive.labels("default", "demo")._value.get() == 1
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
    "own-image": ({"image": "attacker.example/miner:latest"}, "spec.image: unknown field"),
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
        assert all(objects == [] for objects in children(cluster).values())
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
        # The step in flight when suspend arrived was finished, not abandoned; the driver's
        # pod is gone (its Job deleted only once the pod exited).
        assert trace.started == trace.completed
        assert cluster.list(BATCH_JOBS) == [] and trace.runtimes_open == 0
        assert condition(cluster, "sus", "Suspended")["status"] == "True"
        assert condition(cluster, "sus", "Running")["reason"] == "SuspendRequested"
        # Every stage of the PPO job (the learner holds its critic) was scaled to zero, by
        # the driver on its way out and by the operator on the Services.
        zeroed = {stage for job, stage, n in trace.scales if job == "sus" and n == 0}
        assert {"actor", "reward", "learner"} <= zeroed
        for svc in cluster.services():
            ann = svc["spec"]["template"]["metadata"]["annotations"]
            assert ann[AUTOSCALING + "min-scale"] == "0"
        await asyncio.sleep(0.8)  # suspended really means no more steps
        assert cluster.status("sus")["step"] == suspended_at
        assert len(trace.started) == suspended_at

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
        await cluster.wait_for(lambda: cluster.list(BATCH_JOBS) == [], what="driver stopped")
        held_at = len(trace.started)
        await asyncio.sleep(0.6)
        assert len(trace.started) == held_at and trace.started == trace.completed
        await cluster.patch_job_spec("imm", {"model": {"tiny": {"nLayer": 1}}})
        await cluster.wait_for(lambda: cluster.phase("imm") == "Succeeded", what="Succeeded")
    assert [s for _, s in trace.completed] == [1, 2, 3, 4, 5, 6]


async def test_a_spec_change_replaces_the_driver_after_its_step(tmp_path: Path) -> None:
    trace = Trace()
    async with running(tmp_path, trace, step_s=0.2) as cluster:
        await cluster.create_job("grow", {**TINY, "steps": 3, "algorithm": {"klBeta": 0}})
        await cluster.wait_for(lambda: cluster.status("grow").get("step", 0) >= 1, what="step 1")
        [role] = cluster.list(ROLES)
        stage_services = [f"grow-{s}" for s in ("actor", "learner", "reward")]
        services = next(r for r in role["rules"] if r["resources"] == ["services"])
        assert services["resourceNames"] == stage_services  # the stage table's, only those
        # More steps, and a KL term (the learner loads the reference): a new driver.
        await cluster.patch_job_spec("grow", {"steps": 5, "algorithm": {"klBeta": 0.01}})
        await cluster.wait_for(lambda: cluster.phase("grow") == "Succeeded"
                               and cluster.status("grow").get("step") == 5, what="5 steps")
        assert cluster.jobs.started.count("grow-driver") >= 2  # type: ignore[attr-defined]
        [driver] = cluster.list(BATCH_JOBS)
        env = {e["name"]: e.get("value") for e in
               driver["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert '"steps":5' in env[JOB_ENV]  # the running driver has the new spec
        [role] = cluster.list(ROLES)
        services = next(r for r in role["rules"] if r["resources"] == ["services"])
        assert services["resourceNames"] == stage_services
        assert '"klBeta":0.01' in env[JOB_ENV]
    assert [s for _, s in trace.completed] == [1, 2, 3, 4, 5]
    assert trace.started == trace.completed


async def test_operator_restart_leaves_the_driver_running(tmp_path: Path) -> None:
    trace = Trace()
    async with emulated_cluster() as cluster, cluster.job_controller(
            fake_pods(cluster, tmp_path, trace, step_s=0.15)) as jobs:
        async with cluster.operator(fake_hooks(cluster)):
            await cluster.create_job("rs", {**TINY, "steps": 8})
            await cluster.wait_for(lambda: cluster.status("rs").get("step", 0) >= 2,
                                   what="step 2")
        # The operator is gone; the driver is not the operator's: it keeps stepping.
        stopped_at = cluster.status("rs")["step"]
        await cluster.wait_for(lambda: len(trace.completed) >= stopped_at + 2,
                               what="steps without an operator")
        assert cluster.status("rs")["step"] == stopped_at  # nobody reported them
        # The new operator comes with another setting: it updates the job's NetworkPolicy,
        # and the running driver (whose pod does not depend on it) carries on. A driver Role
        # an older operator wrote (here: without the progress rule) is brought up to date.
        [role] = cluster.list(ROLES)
        wanted = role["rules"]
        older = {**role["metadata"], "annotations": {SPEC_HASH: "from-an-older-operator"}}
        cluster.set_object(ROLES, {**role, "metadata": older, "rules": [
            r for r in wanted if r["resources"] != ["configmaps"]]})
        monitoring = FunctionSettings(ingress_namespaces=("knative-serving", "monitoring"))
        async with cluster.operator(fake_hooks(cluster, functions=monitoring)):
            await cluster.wait_for(lambda: cluster.phase("rs") == "Succeeded", what="Succeeded")
        assert cluster.list(ROLES)[0]["rules"] == wanted
        RECORDED.update(cluster.api_calls())
        assert jobs.started == ["rs-driver"]  # one driver throughout
        [policy] = cluster.list(NETPOL)
        [source] = policy["spec"]["ingress"][1]["from"][0]["namespaceSelector"][
            "matchExpressions"]
        assert source["values"] == ["knative-serving", "monitoring"]
    assert [s for _, s in trace.completed] == list(range(1, 9))
    assert trace.started == trace.completed
    assert cluster.status("rs")["step"] == 8


async def test_a_driver_pod_that_dies_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    trace = Trace()
    async with running(tmp_path, trace, step_s=0.3) as cluster:
        await cluster.create_job("oom", {**TINY, "steps": 5})
        await cluster.wait_for(lambda: len(trace.completed) >= 2 and len(trace.started) == 3,
                               what="step 3 in flight")
        cluster.jobs.kill_pod("oom-driver")  # type: ignore[attr-defined]
        done_at_kill = len(trace.completed)
        await cluster.wait_for(lambda: "without a report" in condition(
            cluster, "oom", "Ready").get("message", ""), what="the death reported")
        assert condition(cluster, "oom", "Ready")["reason"] == "DriverError"
        await cluster.wait_for(lambda: cluster.phase("oom") == "Succeeded", what="Succeeded")
        assert cluster.jobs.started == ["oom-driver", "oom-driver"]  # type: ignore[attr-defined]
    # The killed step never reached its checkpoint: it ran again, nothing else did.
    assert [s for _, s in trace.completed] == [1, 2, 3, 4, 5]
    killed = done_at_kill + 1
    assert [s for _, s in trace.started] == [*range(1, killed + 1), *range(killed, 6)]


async def test_delete_stops_the_driver_and_children_are_garbage_collected(
        tmp_path: Path) -> None:
    trace = Trace()
    async with running(tmp_path, trace, step_s=0.3) as cluster:
        await cluster.create_job("gone", {**TINY, "steps": 50})
        await cluster.wait_for(lambda: cluster.status("gone").get("step", 0) >= 1,
                               what="running")
        assert len(cluster.services()) == 3
        await cluster.delete_job("gone")
        # kopf stops the daemon, then releases its finalizer: the job disappears.
        await cluster.wait_for(lambda: cluster.job("gone") is None, what="job deleted")
        # The cluster's garbage collector removes what the job owned, and only that; the
        # driver's pod gets SIGTERM, finishes its step and exits.
        collected = cluster.collect_garbage()
        assert sorted(name for _, name in collected) == sorted([
            "gone-actor", "gone-learner", "gone-reward", "gone-token",
            "gone-functions", "gone-driver", "gone-driver", "gone-driver", "gone-progress",
            "gone-driver"])  # SA, Role, RoleBinding and Job share the driver's name
        await cluster.wait_for(lambda: trace.runtimes_open == 0, what="driver pod exited")
        steps_at_delete = len(trace.started)
        await asyncio.sleep(0.6)
        assert len(trace.started) == steps_at_delete  # nothing runs for a deleted job
        assert trace.started == trace.completed
        assert all(objects == [] for objects in children(cluster).values())


async def test_driver_failure_is_reported_and_retried(tmp_path: Path) -> None:
    trace = Trace(failures_left=1)
    async with running(tmp_path, trace, step_s=0.05) as cluster:
        started = time.monotonic()
        await cluster.create_job("flaky", {**TINY, "steps": 2})
        await cluster.wait_for(lambda: condition(cluster, "flaky", "Ready").get("reason")
                               == "DriverError", what="DriverError")
        message = condition(cluster, "flaky", "Ready")["message"]
        assert "RuntimeError: actor function crashed" in message and "retrying" in message
        await cluster.wait_for(lambda: cluster.phase("flaky") == "Succeeded",
                               what="retry succeeds")
        assert time.monotonic() - started >= 0.2  # backed off
        assert cluster.jobs.started == ["flaky-driver", "flaky-driver"]  # type: ignore


async def test_persistent_failure_waits_for_a_spec_change(tmp_path: Path) -> None:
    trace = Trace(failures_left=10**6)
    async with running(tmp_path, trace, step_s=0.05, max_retries=1) as cluster:
        jobs = cluster.jobs  # type: ignore[attr-defined]
        await cluster.create_job("broken", {**TINY, "steps": 2})
        await cluster.wait_for(lambda: len(jobs.started) == 2, what="two attempts")
        await cluster.wait_for(lambda: "retrying" not in condition(
            cluster, "broken", "Ready").get("message", "retrying"), what="gave up")
        await asyncio.sleep(0.6)
        assert len(jobs.started) == 2  # first try + one retry, then it waits
        assert cluster.phase("broken") == "Failed"
        await cluster.patch_job_spec("broken", {"steps": 3})
        await cluster.wait_for(lambda: len(jobs.started) == 3, what="retry after the change")


async def test_the_driver_pod_reaches_its_functions_through_knative(tmp_path: Path) -> None:
    """The driver pod's Knative runtime: prewarm patches, invocations with the job's token,
    GPU-seconds metered from pods."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from rlhfless.knative.runtime import KnativeRuntime

    invoked: list[tuple[str, str]] = []

    async def invoke(request: web.Request) -> web.Response:
        invoked.append(((await request.json())["request_id"],
                        request.headers.get("Authorization", "")))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/invoke", invoke)
    server = TestServer(app)
    await server.start_server()
    trace = Trace()

    class InvokingDriver(FakeDriver):
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

    try:
        async with emulated_cluster() as cluster:
            knative = asyncio.create_task(
                cluster.emulate_knative(str(server.make_url("")).rstrip("/")))
            pods = in_process(
                cluster, tmp_path,
                lambda job, ns, kube, token, run_dir, store: KnativeRuntime(
                    job, namespace=ns, kube=kube, token=token, meter_interval_s=0.1),
                lambda job, rt, run_dir, store: InvokingDriver(job, rt, run_dir, store, trace,
                                                               0.0))
            async with cluster.operator(fake_hooks(cluster)), cluster.job_controller(pods):
                await cluster.create_job("kn", {**TINY, "steps": 2,
                                                "resources": {"actor": {"gpus": 2}}})
                await cluster.wait_for(lambda: cluster.phase("kn") == "Succeeded",
                                       what="Succeeded")
            knative.cancel()
            RECORDED.update(cluster.api_calls())
            RECORDED_BY_DRIVERS.update(cluster.api_calls(DRIVER_AGENT))
            token = cluster.get(SECRETS, "kn-token")["stringData"]["token"]
            # Prewarm rolled the actor Service to min-scale 2, and back to 0 after.
            actor = cluster.get(KSVC, "kn-actor")
            ann = actor["spec"]["template"]["metadata"]["annotations"]
            assert ann["autoscaling.knative.dev/min-scale"] == "0"
            pods_seen = {p["metadata"]["name"] for p in cluster.list("v1/pods")}
            assert "kn-actor-00001-deployment-1" in pods_seen  # the second, prewarmed actor
    finally:
        await server.close()
    assert sorted(r for r, _ in invoked) == sorted(
        f"s{s}-{x}" for s in (1, 2) for x in ("a0", "a1", "reward", "learner"))
    assert {auth for _, auth in invoked} == {f"Bearer {token}"}  # the job's Secret
    assert [s for _, s in trace.completed] == [1, 2]
    assert trace.gpu_seconds and trace.gpu_seconds[-1] > 0  # metered from the pods


async def test_namespaced_operator_needs_no_cluster_scoped_rights(tmp_path: Path) -> None:
    trace = Trace()
    async with emulated_cluster() as cluster:
        async with cluster.operator(fake_hooks(cluster), namespace="default"), \
                cluster.job_controller(fake_pods(cluster, tmp_path, trace, 0.05)):
            await cluster.create_job("ns", {**TINY, "steps": 2})
            await cluster.wait_for(lambda: cluster.phase("ns") == "Succeeded", what="Succeeded")
        calls = cluster.api_calls()
    assert calls <= NAMESPACED_RULES, calls - NAMESPACED_RULES
    assert {("rlhfless.io", "rlhfjobs", "watch"), ("batch", "jobs", "create")} <= calls


def test_operator_and_driver_calls_stay_within_their_rbac_rules() -> None:
    """Runs after the tests above (file order): what they recorded is what the operator and
    the drivers need; the Helm chart must grant exactly OPERATOR_RULES, and each driver's
    Role exactly DRIVER_RULES."""
    if not RECORDED:
        pytest.skip("run with the operator tests of this module")
    assert RECORDED <= OPERATOR_RULES, RECORDED - OPERATOR_RULES
    assert OPERATOR_RULES - RECORDED <= NOT_SEEN_IN_TESTS, OPERATOR_RULES - RECORDED
    # The essentials were exercised for real.
    assert {("rlhfless.io", "rlhfjobs", "watch"), ("rlhfless.io", "rlhfjobs/status", "patch"),
            ("serving.knative.dev", "services", "create"), ("batch", "jobs", "create"),
            ("batch", "jobs", "delete"), ("", "secrets", "create")} <= RECORDED
    # The operator never reads a Secret, never lists pods, never touches another job's files.
    assert not {c for c in RECORDED if c[1] == "secrets" and c[2] != "create"}
    assert ("", "pods", "list") not in RECORDED
    assert RECORDED_BY_DRIVERS == DRIVER_RULES, RECORDED_BY_DRIVERS ^ DRIVER_RULES
