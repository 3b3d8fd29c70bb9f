"""The driver forecasts a budgeted job's next step from its plan, calibrated on the step it
just measured, and the budget check sees that forecast."""

from __future__ import annotations

import asyncio
import time

import pytest
from inprocess_runtime import InProcessRuntime

from rlhfless.cost import check_budget, planned_cost
from rlhfless.driver import Driver
from rlhfless.driver.records import MetricsLog
from rlhfless.runtime.base import InstanceUsage
from rlhfless.store import WeightStore
from tests.conftest import tiny_job


class _BilledRuntime(InProcessRuntime):
    """Bills each in-process instance one GPU from when it started, as a platform would."""

    def _start(self, stage: str) -> str:
        name = super()._start(stage)
        self.started = {**getattr(self, "started", {}), name: time.time()}
        return name

    def meter(self) -> list[InstanceUsage]:
        return [InstanceUsage(stage=name.rsplit("-", 1)[0], instance=name, gpus=1.0,
                              started_at=t, ended_at=None, cold_start_s=0.0)
                for name, t in getattr(self, "started", {}).items()]


def _run(tmp_path, **budget):
    job = tiny_job("forecast", steps=2, budget=budget,
                   scheduling={"prewarm": False, "actors": 1, "maxActors": 1})
    driver = Driver(job, _BilledRuntime(job, WeightStore(tmp_path / "store")), tmp_path)
    seen = []

    async def on_step(record):
        items = driver._prompt_items(record.step + 1) if record.step < 2 else None
        upcoming = driver.planner.next_step_gpu_seconds(items, driver._alive("actor")) \
            if items else None
        seen.append((driver.ledger.planned, upcoming, driver.budget))

    done = asyncio.run(driver.run(on_step=on_step))
    return done, seen, MetricsLog(tmp_path / "metrics.jsonl").read(), driver


def test_the_next_step_is_forecast_from_its_plan(tmp_path):
    done, seen, rows, driver = _run(tmp_path, maxGpuHours=100)
    assert done == 2
    (after_first, upcoming, _), (after_last, _, _) = seen
    row = rows[0]
    assert row["cost/gpu_seconds"] > 0
    chosen = row[f"sched/table/n{int(row['sched/actors'])}/gpu_seconds"]
    # The plan's own ratio (next step / this step) applied to what this step cost.
    expected = planned_cost(upcoming, chosen, row["cost/gpu_seconds"], row.get("cost/dollars"))
    assert after_first is not None and after_first[0] > 0
    assert after_first[0] == pytest.approx(expected[0])
    assert after_last is None  # nothing follows the last step
    # A budget the forecast crosses (but the last step alone would not) stops the run.
    ledger = driver.ledger
    ledger.planned = (ledger.next_step()[0] * 10, None)
    spent_h = ledger.gpu_seconds / 3600
    limit = spent_h + ledger.next_step()[0] / 3600 * 0.5
    check = check_budget(ledger, driver.spec.budget.model_copy(update={"max_gpu_hours": limit}))
    assert check.exceeded and "the plan for the next" in check.message


def test_an_unbudgeted_job_plans_no_forecast(tmp_path):
    _, seen, _, _ = _run(tmp_path)
    assert all(planned is None for planned, _, _ in seen)
