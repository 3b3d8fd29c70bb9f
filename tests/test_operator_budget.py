"""Cost in the operator: status.cost, Prometheus cost series, prices from the chart, and a
budget that suspends a job (condition BudgetExceeded) until it is raised.

The kmock tests run the real kopf handlers and real driver pods (`driver_pod.drive`, the
emulated Job controller) around a fake driver that keeps the real driver's contract: a
checkpoint and a metrics.jsonl row per step, the spend totalled from the checkpointed rows,
stop after the current step when asked or when the next step would cross the budget."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from driver_pods import in_process
from kmock_cluster import Cluster, emulated_cluster
from prometheus_client import generate_latest

from rlhfless.api.progress import StepSummary
from rlhfless.api.spec import GpuPrice, parse_spec
from rlhfless.cost import (
    BudgetCheck,
    CostDefaults,
    Ledger,
    check_budget,
    cost_status,
    job_prices,
)
from rlhfless.cost.prices import cost_defaults_from_env, priced_job
from rlhfless.driver.records import MetricsLog, StepRecord
from rlhfless.jobmetrics import exported_metrics
from rlhfless.operator import status as st
from rlhfless.operator.config import OperatorConfig
from rlhfless.operator.decide import Action, DriverState, JobView, decide
from rlhfless.operator.metrics import OperatorMetrics
from rlhfless.runtime.base import InstanceUsage
from rlhfless.store import Checkpoint, load_checkpoint, save_checkpoint

T0 = "2026-01-01T00:00:00Z"
TINY = {"model": {"source": "tiny", "tiny": {"nLayer": 1, "nEmbd": 16, "nHead": 2,
                                             "nPositions": 64}},
        "generation": {"maxNewTokens": 8}}
STEP_GPU_S = 1800.0  # each fake step: half a GPU-hour
STEP_USD = 2.5


def step_row(step: int) -> dict[str, float]:
    return {"timing_s/step": 0.1, "cost/gpu_seconds": STEP_GPU_S,
            "cost/gpu_seconds/actor": 1200.0, "cost/gpu_seconds/learner": 600.0,
            "cost/dollars": STEP_USD, "cost/dollars/actor": 1.5, "cost/dollars/learner": 1.0,
            "cost/split/busy/actor": 1000.0, "cost/split/keep_alive_idle/actor": 200.0,
            "cost/split/cold_start/learner": 600.0, "cost/serverful/gpu_seconds": 3600.0,
            "cost/serverful/dollars": 5.0, "cost/tail/share": 0.25, "reward/mean": 0.5}


# -- pure parts ----------------------------------------------------------------------------

def summary(step: int) -> StepSummary:
    """Step `step` as a driver pod publishes it."""
    return StepSummary(step=step, reward=0.5, gpu_seconds_total=step * STEP_GPU_S,
                       weights_version=step, metrics=exported_metrics(step_row(step)))


def test_decide_suspends_for_the_budget_after_the_other_reasons() -> None:
    view = JobView(valid=True, steps_done=2, steps=5, over_budget=True)
    assert decide(view) is Action.BUDGET
    assert decide(replace(view, driver=DriverState.FINISHED)) is Action.BUDGET
    assert decide(replace(view, suspend=True)) is Action.SUSPEND
    assert decide(replace(view, steps_done=5)) is Action.SUCCEEDED
    assert decide(replace(view, valid=False)) is Action.INVALID
    assert decide(replace(view, over_budget=False)) is Action.START


def test_budget_condition_sets_and_clears() -> None:
    cost = {"gpuSeconds": 3600.0, "dollars": 5.0}
    over = st.budget_exceeded([], 2, "spec.budget.maxGpuHours: 1 of 1.2 ...", 4, now=T0,
                              cost=cost)
    assert over["phase"] == "Suspended" and over["step"] == 2 and over["cost"] == cost
    conds = {c["type"]: c for c in over["conditions"]}
    assert conds["BudgetExceeded"]["status"] == "True"
    assert conds["BudgetExceeded"]["reason"] == "NextStepOverBudget"
    assert conds["BudgetExceeded"]["message"].startswith("spec.budget.maxGpuHours")
    assert conds["Suspended"]["status"] == "True" and conds["Running"]["status"] == "False"
    # Raising the budget: the next start clears it.
    again = st.started(over["conditions"], ["j-actor"], "j-driver", 2, 5, 5, now=T0,
                       has_budget=True)
    assert st.condition(again, "BudgetExceeded")["status"] == "False"  # type: ignore[index]
    # Removing the budget clears it too; a job that never had one gets no such condition.
    removed = st.started(over["conditions"], ["j-actor"], "j-driver", 2, 5, 5, now=T0)
    assert st.condition(removed, "BudgetExceeded")["reason"] == "WithinBudget"  # type: ignore[index]
    assert st.condition(st.started([], ["j-actor"], "j-driver", 0, 5, 1, now=T0),
                        "BudgetExceeded") is None


def test_step_status_carries_the_cost() -> None:
    patch = st.step_done([], summary(1), 5, "run/checkpoint.json", None, now=T0,
                         cost={"gpuSeconds": 1800.0})
    assert patch["cost"] == {"gpuSeconds": 1800.0}
    assert "cost" not in st.step_done([], summary(1), 5, "run/checkpoint.json", None, now=T0)


def test_status_patches_fit_the_crd_status_schema() -> None:
    """What the operator writes is what the CRD stores: no field pruned, every type right."""
    from crd_schema import _schema_errors, _unknown_fields, openapi

    schema = openapi()["properties"]["status"]
    ledger = Ledger.of([step_row(1), step_row(2)])
    unpriced = Ledger.of([{"cost/gpu_seconds": 5.0, "cost/gpu_seconds/actor": 5.0}])
    cp = "jobs/ns/j-abcdef01/run/checkpoint.json"
    for patch in (st.step_done([], summary(2), 5, cp, 1, now=T0, cost=cost_status(ledger)),
                  st.budget_exceeded([], 2, "over", 1, now=T0, cost=cost_status(ledger)),
                  st.step_done([], summary(2), 5, cp, 1, now=T0, cost=cost_status(unpriced)),
                  st.started([], ["j-actor"], "j-driver", 0, 5, 1, now=T0, has_budget=True)):
        assert _schema_errors(patch, schema, "status") == []
        assert _unknown_fields(patch, schema, "status") == []
    assert "dollars" not in cost_status(unpriced)


def test_cost_metrics_are_exported_per_stage_and_use() -> None:
    """From what a driver pod publishes (the operator) and from a StepRecord (a process
    that drove the step itself): the same series."""
    m = OperatorMetrics()
    m.observe_step("ns", "j", summary(1))
    m.observe_step("ns", "j", StepRecord(2, step_row(2), 0.5, 2 * STEP_GPU_S, 2, "cp"))
    m.observe_budget("ns", "j", 0.75)
    m.observe_budget("ns", "nobudget", None)
    text = generate_latest(m.registry).decode()
    for line in (
        'rlhfless_cost_dollars_total{job="j",namespace="ns",stage="actor"} 3.0',
        'rlhfless_cost_dollars_total{job="j",namespace="ns",stage="learner"} 2.0',
        'rlhfless_gpu_seconds_by_use_total{job="j",namespace="ns",stage="actor",use="busy"} '
        '2000.0',
        'rlhfless_gpu_seconds_by_use_total{job="j",namespace="ns",stage="learner",'
        'use="cold_start"} 1200.0',
        'rlhfless_serverful_gpu_seconds_total{job="j",namespace="ns"} 7200.0',
        'rlhfless_serverful_dollars_total{job="j",namespace="ns"} 10.0',
        'rlhfless_rollout_tail_ratio{job="j",namespace="ns"} 0.25',
        'rlhfless_budget_used_ratio{job="j",namespace="ns"} 0.75',
    ):
        assert line in text, line
    assert 'job="nobudget"' not in text
    m.forget("ns", "j")
    assert 'job="j"' not in generate_latest(m.registry).decode()


def test_chart_prices_reach_the_driver_and_bad_ones_stop_the_operator() -> None:
    env = {"RLHFLESS_GPU_TYPE": "L40S", "RLHFLESS_PRICING": "spot",
           "RLHFLESS_GPU_PRICES": '{"L40S": {"onDemand": 2.0, "spot": 0.8}}'}
    config = OperatorConfig.from_env(env)
    assert config.cost == CostDefaults("L40S", "spot", {"L40S": GpuPrice(on_demand=2.0,
                                                                          spot=0.8)})
    job = parse_spec({**TINY, "cost": {"stageGpuTypes": {"learner": "H100"}}})
    prices = job_prices(priced_job(job, config.cost).spec)
    # ... as the driver pod reads them back from the environment the operator gives it.
    from rlhfless.cost.prices import cost_env

    handed = cost_defaults_from_env({e["name"]: e["value"] for e in cost_env(config.cost)})
    assert handed == config.cost
    assert prices.of("actor") == 0.8  # the chart's GPU type and spot price
    assert prices.of("learner") == 3.00  # the job's GPU type, the built-in spot price
    assert job_prices(job.spec).of("actor") == 6.88  # unpriced by a cluster: the defaults
    for bad, field in ((
            {"RLHFLESS_GPU_PRICES": '{"H100": {"onDemand": -1}}'}, "H100.onDemand"),
            ({"RLHFLESS_GPU_PRICES": '{"H100": {"spot": "x"}}'}, "H100.spot"),
            ({"RLHFLESS_GPU_PRICES": "{"}, "not JSON"),
            ({"RLHFLESS_PRICING": "reserved"}, "RLHFLESS_PRICING")):
        with pytest.raises(ValueError, match=field):
            cost_defaults_from_env(bad)


# -- the operator under kmock --------------------------------------------------------------

class MeteredDriver:
    """The driver's contract without the ML: one metrics.jsonl row and a checkpoint per
    step, resume from the checkpoint, the spend totalled from the checkpointed rows, stop
    after the current step when asked or when the next one would cross spec.budget."""

    def __init__(self, job: Any, runtime: Any, run_dir: Path, started: list[int]):
        self.job, self.runtime, self.run_dir, self.started = job, runtime, run_dir, started
        cp = load_checkpoint(run_dir)
        self.saved_step = cp.step if cp else 0
        self.ledger, self.budget = Ledger(), BudgetCheck()

    def prepare(self) -> str | None:
        log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.ledger = Ledger.of(log.read(upto=self.saved_step))
        self.budget = check_budget(self.ledger, self.job.spec.budget)
        return None

    async def run(self, stop: asyncio.Event | None = None, on_step: Any = None) -> int:
        cp = load_checkpoint(self.run_dir) or Checkpoint()
        log = MetricsLog(self.run_dir / "metrics.jsonl")
        while cp.step < self.job.spec.steps and not (stop is not None and stop.is_set()):
            if self.budget.exceeded:
                break
            step = cp.step + 1
            self.started.append(step)
            await asyncio.sleep(0.05)
            cp = Checkpoint(step=step, weights_version=step,
                            gpu_seconds_total=cp.gpu_seconds_total + STEP_GPU_S)
            record = StepRecord(step, step_row(step), 0.5, cp.gpu_seconds_total, step,
                                str(self.run_dir / "checkpoint.json"))
            log.append(record)
            save_checkpoint(self.run_dir, cp)
            self.saved_step = step
            self.ledger.add(record.metrics)
            self.budget = check_budget(self.ledger, self.job.spec.budget)
            if on_step is not None:
                await on_step(record)
        for stage in self.job.spec.stages.deployed:
            await self.runtime.scale(stage, 0)
        return cp.step


class ScaleRecorder:
    def __init__(self, scales: list[tuple[str, int]]):
        self.scales = scales

    async def __aenter__(self) -> ScaleRecorder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def scale(self, stage: str, n: int) -> None:
        self.scales.append((stage, n))

    def meter(self) -> list[InstanceUsage]:
        return [InstanceUsage("actor", "actor-0", 1, time.time(), None, 0.0)]


@contextlib.asynccontextmanager
async def operator(tmp_path: Path, started: list[int], scales: list[tuple[str, int]],
                   metrics: OperatorMetrics):
    async with emulated_cluster() as cluster:
        config = OperatorConfig(watch_interval_s=0.05, progress_interval_s=0.05,
                                retry_backoff_s=0.2)
        pods = in_process(
            cluster, tmp_path, lambda job, ns, kube, token, run_dir, store: ScaleRecorder(scales),
            lambda job, rt, run_dir, store: MeteredDriver(job, rt, run_dir, started))
        async with cluster.operator(cluster.hooks(config=config, metrics=metrics)), \
                cluster.job_controller(pods):
            yield cluster


def cond(cluster: Cluster, name: str, type_: str) -> dict[str, Any]:
    return st.condition(cluster.status(name), type_) or {}


async def test_budget_suspends_the_job_and_raising_it_resumes(tmp_path: Path) -> None:
    """Half a GPU-hour a step and a 1.2 GPU-hour budget: after step 2 (1.0 spent, the next
    step would make it 1.5) the job suspends; raising the budget to 10 finishes it."""
    started: list[int] = []
    scales: list[tuple[str, int]] = []
    metrics = OperatorMetrics()
    async with operator(tmp_path, started, scales, metrics) as cluster:
        await cluster.create_job("capped", {**TINY, "steps": 5,
                                            "budget": {"maxGpuHours": 1.2}})
        await cluster.wait_for(lambda: cond(cluster, "capped", "BudgetExceeded").get("status")
                               == "True", what="BudgetExceeded")
        status = cluster.status("capped")
        assert status["phase"] == "Suspended" and status["step"] == 2
        message = cond(cluster, "capped", "BudgetExceeded")["message"]
        assert "spec.budget.maxGpuHours" in message and "1 of 1.2 GPU-hours" in message
        assert cond(cluster, "capped", "Suspended")["reason"] == "NextStepOverBudget"
        assert status["cost"]["gpuSeconds"] == 2 * STEP_GPU_S
        assert status["cost"]["dollars"] == 2 * STEP_USD
        assert status["cost"]["stages"]["actor"] == {"gpuSeconds": 2400.0, "dollars": 3.0}
        assert status["cost"]["serverfulGpuSeconds"] == 7200.0
        assert status["cost"]["nextStepGpuSeconds"] == STEP_GPU_S
        assert {stage for stage, n in scales if n == 0} >= {"actor", "reward", "learner"}
        await asyncio.sleep(0.5)  # suspended means no further step
        assert started == [1, 2]
        assert metrics.budget_used.labels("default", "capped")._value.get() == pytest.approx(
            (2 * STEP_GPU_S / 3600) / 1.2)

        await cluster.patch_job_spec("capped", {"budget": {"maxGpuHours": 10}})
        await cluster.wait_for(lambda: cluster.phase("capped") == "Succeeded",
                               what="Succeeded after raising the budget")
        assert cond(cluster, "capped", "BudgetExceeded")["status"] == "False"
        assert cluster.status("capped")["cost"]["gpuSeconds"] == 5 * STEP_GPU_S
    assert started == [1, 2, 3, 4, 5]
    dollars = metrics.dollars.labels("default", "capped", "actor")._value.get()
    assert dollars == pytest.approx(5 * 1.5)


async def test_dollar_budget_and_an_exhausted_budget_on_restart(tmp_path: Path) -> None:
    """$2.5 a step, $6 budget: 2 steps. A budget lowered below the spend keeps it
    suspended without starting the driver again."""
    started: list[int] = []
    scales: list[tuple[str, int]] = []
    async with operator(tmp_path, started, scales, OperatorMetrics()) as cluster:
        await cluster.create_job("usd", {**TINY, "steps": 4, "budget": {"maxDollars": 6}})
        await cluster.wait_for(lambda: cluster.phase("usd") == "Suspended", what="Suspended")
        assert "spec.budget.maxDollars: 5 of 6 dollars" in cond(cluster, "usd",
                                                                 "BudgetExceeded")["message"]
        await cluster.patch_job_spec("usd", {"budget": {"maxDollars": 1}})
        await cluster.wait_for(lambda: cond(cluster, "usd", "BudgetExceeded").get(
            "observedGeneration") == 2, what="re-checked after the change")
        await asyncio.sleep(0.3)
        assert cluster.phase("usd") == "Suspended" and started == [1, 2]
