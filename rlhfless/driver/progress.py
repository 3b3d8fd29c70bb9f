"""The driver's progress as the operator sees it (`api.progress`), built step by step."""

from __future__ import annotations

import time

from rlhfless.api.progress import MAX_RECORDS, CostReport, DriverState, Progress, StepSummary
from rlhfless.driver.records import StepRecord
from rlhfless.jobmetrics import actors_alive, exported_metrics
from rlhfless.runtime.base import InstanceUsage


def step_summary(record: StepRecord, usages: list[InstanceUsage]) -> StepSummary:
    return StepSummary(
        step=record.step, reward=float(record.reward_mean),
        gpu_seconds_total=max(0.0, float(record.gpu_seconds_total)),
        weights_version=record.weights_version,
        actors_alive=actors_alive(usages),
        metrics=exported_metrics(record.metrics),
    )


class ProgressTracker:
    """What has happened so far; `snapshot()` is the document to publish."""

    def __init__(self, steps: int, checkpoint_step: int = 0):
        self.progress = Progress(steps=steps, checkpoint_step=checkpoint_step)

    def snapshot(self, state: DriverState | None = None, error: str | None = None,
                 notice: str | None = None, cost: CostReport | None = None) -> Progress:
        changes: dict[str, object] = {"updated_at": time.time()}
        if state is not None:
            changes["state"] = state
        if error is not None:
            changes["error"] = error[-4000:]
        if notice is not None:
            changes["notice"] = notice[:4000]
        if cost is not None:
            changes["cost"] = cost
        self.progress = self.progress.model_copy(update=changes)
        return self.progress

    def step(self, summary: StepSummary, checkpoint_step: int,
             cost: CostReport | None = None) -> Progress:
        records = [*self.progress.records, summary][-MAX_RECORDS:]
        self.progress = self.progress.model_copy(update={
            "records": records, "checkpoint_step": checkpoint_step, "state": "running"})
        return self.snapshot(cost=cost)
