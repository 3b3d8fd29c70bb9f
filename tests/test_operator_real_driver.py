"""The real kopf operator with real driver pods: real RL steps, and a spec path that does
not exist reported by the driver pod while the operator never touches it.

The first test runs the driver pod in-process on the embedded local runtime (stage
functions are local processes serving a tiny model), so the status the operator reports
comes from real RL steps (rewards, GPU-second meter, checkpoints). The second runs the real
`rlhfless driver` command as a subprocess against the emulated API.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from driver_pods import in_process, subprocess_pod
from kmock_cluster import BATCH_JOBS, KSVC, SECRETS, emulated_cluster

from rlhfless.api.spec import GpuPrice
from rlhfless.cost import CostDefaults
from rlhfless.driver.records import MetricsLog
from rlhfless.operator.config import OperatorConfig
from rlhfless.operator.metrics import OperatorMetrics
from rlhfless.runtime.local import LocalRuntime

SPEC = {
    "model": {"source": "tiny", "tiny": {"nLayer": 1, "nEmbd": 32, "nHead": 2,
                                         "nPositions": 64, "seed": 0}},
    "algorithm": {"name": "grpo", "groupSize": 4, "lr": 0.003, "miniBatchSize": 8},
    "dataset": {"kind": "repeat", "size": 4, "promptsPerStep": 2},
    "reward": {"name": "target_char", "args": {"char": "5"}},
    "generation": {"maxNewTokens": 8},
    "scheduling": {"actors": 1, "maxActors": 1, "keepAliveS": 60, "prewarm": False},
    "steps": 2,
}


@pytest.mark.slow
async def test_operator_runs_real_steps_and_reports_them(tmp_path: Path) -> None:
    metrics = OperatorMetrics()
    async with emulated_cluster() as cluster:
        hooks = cluster.hooks(
            config=OperatorConfig(watch_interval_s=0.05, progress_interval_s=0.1,
                                  cost=CostDefaults("L4", "spot", {"L4": GpuPrice(spot=0.36)})),
            metrics=metrics)
        pods = in_process(
            cluster, tmp_path,
            lambda job, ns, kube, token, run_dir, store: LocalRuntime(
                job, store, run_dir, threads_per_instance=1, token=token))
        async with cluster.operator(hooks), cluster.job_controller(pods):
            created = await cluster.create_job("real", SPEC)
            steps_seen: list[int] = []

            def progressed() -> bool:
                step = cluster.status("real").get("step")
                if step and step not in steps_seen:
                    steps_seen.append(step)
                return cluster.phase("real") in ("Succeeded", "Failed")

            await cluster.wait_for(progressed, timeout=240, interval=0.05, what="job end")
        status = cluster.status("real")
    assert status["phase"] == "Succeeded", status
    # The status carries the latest step: one progress read can bring both steps on a
    # loaded machine, so step 1 may never be the status. It never goes back, and the
    # step counter below still counts every step the driver recorded.
    assert steps_seen in ([1, 2], [2])
    assert status["weightsVersion"] == 2
    assert 0.0 <= status["reward"] <= 1.0
    assert status["costGpuSeconds"] > 0  # actor and learner hold 1 GPU each
    home = Path("jobs") / "default" / f"real-{created['metadata']['uid'][:8]}"
    assert status["checkpoint"] == str(home / "run" / "checkpoint.json")
    rows = MetricsLog(tmp_path / home / "run" / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == [1, 2]
    assert status["reward"] == pytest.approx(rows[-1]["reward/mean"])
    assert metrics.steps.labels("default", "real")._value.get() == 2
    # The cluster's GPU type and price reached the driver: status.cost in dollars.
    cost = status["cost"]
    assert cost["gpuSeconds"] == pytest.approx(sum(r["cost/gpu_seconds"] for r in rows), rel=1e-3)
    assert cost["dollars"] == pytest.approx(cost["gpuSeconds"] * 0.36 / 3600, rel=1e-3)
    assert cost["serverfulGpuSeconds"] > 0


def ready_reason(cluster: Any, name: str) -> str | None:
    for cond in cluster.status(name).get("conditions") or []:
        if cond["type"] == "Ready":
            return cond.get("reason")
    return None


class _FileAccess:
    """Every path this process opens, lists or stats while armed (audit hook + os.stat)."""

    armed = False
    seen: list[str] = []

    @classmethod
    def hook(cls, event: str, args: tuple[Any, ...]) -> None:
        if cls.armed and event in ("open", "os.listdir", "os.scandir") and args:
            cls.seen.append(str(args[0]))


sys.addaudithook(_FileAccess.hook)


@pytest.mark.slow
async def test_the_operator_never_opens_a_spec_path_and_the_driver_pod_reports_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "/nonexistent-rlhfless-model/weights"
    spec = {**SPEC, "model": {"source": "hf", "path": missing},
            "dataset": {"kind": "jsonl", "path": "/nonexistent-rlhfless-data/train.jsonl"}}
    real_stat = os.stat

    def watched_stat(path: Any, *args: Any, **kwargs: Any) -> Any:
        if _FileAccess.armed:
            _FileAccess.seen.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", watched_stat)
    logs: list[str] = []
    async with emulated_cluster() as cluster:
        hooks = cluster.hooks(
            config=OperatorConfig(watch_interval_s=0.05, progress_interval_s=0.1,
                                  max_retries=0),
            metrics=OperatorMetrics())
        _FileAccess.seen.clear()
        _FileAccess.armed = True
        try:
            async with cluster.operator(hooks), cluster.job_controller(
                    subprocess_pod(cluster, tmp_path, logs)):
                await cluster.create_job("ghost", spec)
                await cluster.wait_for(lambda: ready_reason(cluster, "ghost") == "DriverError",
                                       timeout=180, what="the driver's report")
        finally:
            _FileAccess.armed = False
        status = cluster.status("ghost")
        # The operator created everything (it never looked at the paths)...
        assert {s["metadata"]["name"] for s in cluster.list(KSVC)} == {
            "ghost-actor", "ghost-reward", "ghost-learner"}
        assert cluster.get(SECRETS, "ghost-token") is not None
        assert [j["metadata"]["name"] for j in cluster.list(BATCH_JOBS)] == ["ghost-driver"]
    # ...the driver pod found the path missing and said so, through the job's status...
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert missing in ready["message"], (ready["message"], logs)
    assert status["phase"] == "Failed"
    # ...and nothing in this process (the operator's) opened, listed or stat-ed it.
    assert not [p for p in _FileAccess.seen if "nonexistent-rlhfless" in p]
    assert _FileAccess.seen  # the watch was live
