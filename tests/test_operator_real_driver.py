"""The real kopf operator running the real driver on the embedded local runtime.

Knative is swapped for `LocalRuntime` through the operator's runtime hook: stage functions
are local processes serving a tiny model, so the status the operator reports comes from
real RL steps (rewards, GPU-second meter, checkpoints).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kmock_cluster import emulated_cluster

from rlhfless.api.spec import GpuPrice
from rlhfless.cost import CostDefaults
from rlhfless.driver.records import MetricsLog
from rlhfless.operator.config import OperatorConfig, real_driver
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
            config=OperatorConfig(data_dir=tmp_path, watch_interval_s=0.05,
                                  cost=CostDefaults("L4", "spot", {"L4": GpuPrice(spot=0.36)})),
            runtime_factory=lambda ctx: LocalRuntime(ctx.job, ctx.store_dir, ctx.run_dir,
                                                     threads_per_instance=1),
            driver_factory=real_driver,
            metrics=metrics,
        )
        async with cluster.operator(hooks):
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
    assert steps_seen == [1, 2]
    assert status["weightsVersion"] == 2
    assert 0.0 <= status["reward"] <= 1.0
    assert status["costGpuSeconds"] > 0  # actor, reference and trainer hold 1 GPU each
    run_dir = tmp_path / "jobs" / "default" / f"real-{created['metadata']['uid'][:8]}" / "run"
    assert status["checkpoint"] == str(run_dir / "checkpoint.json")
    rows = MetricsLog(run_dir / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == [1, 2]
    assert status["reward"] == pytest.approx(rows[-1]["reward/mean"])
    assert metrics.steps.labels("default", "real")._value.get() == 2
    # The cluster's GPU type and price reached the driver: status.cost in dollars.
    cost = status["cost"]
    assert cost["gpuSeconds"] == pytest.approx(sum(r["cost/gpu_seconds"] for r in rows), rel=1e-3)
    assert cost["dollars"] == pytest.approx(cost["gpuSeconds"] * 0.36 / 3600, rel=1e-3)
    assert cost["serverfulGpuSeconds"] > 0
