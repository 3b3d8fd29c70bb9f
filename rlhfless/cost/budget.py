"""Spend so far, the next step's predicted cost, and whether the budget lets it run.

The ledger reads the steps' metrics rows (metrics.jsonl, or each step's row as it lands).
The next step is predicted as the larger of the last few steps' cost (a step's cost varies
with its prompts' lengths and cold starts; the largest recent one keeps the prediction on
the safe side) and the plan's estimate for the next step's prompts (`planned_cost`: the
plan's GPU-seconds, scaled by how far the plan was off on the step just measured, so a
next step whose prompts the plan expects to run longer is foreseen). Before any step there
is nothing to predict from: the first step runs unless the budget is already spent.

A limit in dollars needs a price for every GPU type the job uses; without one it cannot be
checked, which `check_budget` reports as a warning, not as exceeded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rlhfless.api.progress import CostReport
from rlhfless.api.spec import BudgetSpec
from rlhfless.cost.row import (
    KEY_DOLLARS,
    KEY_GPU_SECONDS,
    KEY_SERVERFUL_DOLLARS,
    KEY_SERVERFUL_GPU_SECONDS,
    SECONDS_PER_HOUR,
)

RECENT_STEPS = 3
STAGE_GPU_SECONDS = KEY_GPU_SECONDS + "/"
STAGE_DOLLARS = KEY_DOLLARS + "/"


def _num(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    return None if value is None else float(value)


def _add(total: float | None, value: float | None) -> float | None:
    """Dollar totals stay known only while every step had one."""
    return None if total is None or value is None else total + value


@dataclass
class Ledger:
    """Running totals over recorded steps (per stage too) and the last few steps' costs."""

    steps: int = 0
    gpu_seconds: float = 0.0
    dollars: float | None = 0.0
    stage_gpu_seconds: dict[str, float] = field(default_factory=dict)
    stage_dollars: dict[str, float] = field(default_factory=dict)
    serverful_gpu_seconds: float = 0.0
    serverful_dollars: float | None = 0.0
    recent: deque[tuple[float, float | None]] = field(
        default_factory=lambda: deque(maxlen=RECENT_STEPS))
    # The plan's (GPU-seconds, dollars) for the next step; None when there is none.
    planned: tuple[float, float | None] | None = None

    @classmethod
    def of(cls, rows: Iterable[Mapping[str, Any]]) -> Ledger:
        ledger = cls()
        for row in rows:
            ledger.add(row)
        return ledger

    def add(self, row: Mapping[str, Any]) -> None:
        gpu_s = _num(row, KEY_GPU_SECONDS) or 0.0
        usd = _num(row, KEY_DOLLARS)
        self.steps += 1
        self.gpu_seconds += gpu_s
        self.dollars = _add(self.dollars, usd)
        for key, value in row.items():
            for prefix, totals in ((STAGE_GPU_SECONDS, self.stage_gpu_seconds),
                                   (STAGE_DOLLARS, self.stage_dollars)):
                if key.startswith(prefix):
                    stage = key[len(prefix):]
                    totals[stage] = totals.get(stage, 0.0) + float(value)
        self.serverful_gpu_seconds += _num(row, KEY_SERVERFUL_GPU_SECONDS) or 0.0
        self.serverful_dollars = _add(self.serverful_dollars,
                                      _num(row, KEY_SERVERFUL_DOLLARS))
        self.recent.append((gpu_s, usd))

    def report(self) -> CostReport:
        """The totals as data: what a job's driver pod publishes for the operator."""
        return CostReport(
            steps=self.steps, gpu_seconds=self.gpu_seconds, dollars=self.dollars,
            stage_gpu_seconds=dict(self.stage_gpu_seconds),
            stage_dollars=dict(self.stage_dollars),
            serverful_gpu_seconds=self.serverful_gpu_seconds,
            serverful_dollars=self.serverful_dollars, recent=list(self.recent),
            planned=self.planned)

    @classmethod
    def from_report(cls, report: CostReport) -> Ledger:
        """The ledger a report was made from (the operator's view of a driver's spend)."""
        return cls(steps=report.steps, gpu_seconds=report.gpu_seconds, dollars=report.dollars,
                   stage_gpu_seconds=dict(report.stage_gpu_seconds),
                   stage_dollars=dict(report.stage_dollars),
                   serverful_gpu_seconds=report.serverful_gpu_seconds,
                   serverful_dollars=report.serverful_dollars,
                   recent=deque(report.recent[-RECENT_STEPS:], maxlen=RECENT_STEPS),
                   planned=report.planned)

    def next_step(self) -> tuple[float, float | None]:
        """Predicted (GPU-seconds, dollars) of the next step: the largest recent one, or the
        plan's estimate when that is larger."""
        if not self.recent:
            return 0.0, 0.0
        candidates = list(self.recent) + ([self.planned] if self.planned else [])
        usd = [d for _, d in candidates]
        known = [d for d in usd if d is not None]
        return max(g for g, _ in candidates), (max(known) if len(known) == len(usd) else None)


def planned_cost(next_plan_gpu_s: float, plan_gpu_s: float, measured_gpu_s: float,
                 measured_dollars: float | None) -> tuple[float, float | None] | None:
    """The next step's (GPU-seconds, dollars) from its plan, calibrated on the step just
    measured: the plan's ratio next/this applied to what this step cost (dollars at this
    step's price per GPU-second). None when the plan gave nothing to scale by."""
    if plan_gpu_s <= 0 or next_plan_gpu_s < 0 or measured_gpu_s < 0:
        return None
    gpu_s = measured_gpu_s * next_plan_gpu_s / plan_gpu_s
    if measured_dollars is None:
        return gpu_s, None
    rate = measured_dollars / measured_gpu_s if measured_gpu_s > 0 else 0.0
    return gpu_s, gpu_s * rate


@dataclass(frozen=True)
class BudgetCheck:
    exceeded: bool = False
    message: str = ""
    used: float | None = None  # the largest fraction of a limit spent so far (0-1+)
    warnings: tuple[str, ...] = ()


def check_budget(ledger: Ledger, budget: BudgetSpec) -> BudgetCheck:
    """Would the next step take the spend past a limit? (None set: never.)"""
    next_gpu_s, next_usd = ledger.next_step()
    limits: list[tuple[str, float, float, float]] = []  # field, limit, spent, next
    warnings: list[str] = []
    if budget.max_gpu_hours is not None:
        limits.append(("maxGpuHours", budget.max_gpu_hours,
                       ledger.gpu_seconds / SECONDS_PER_HOUR, next_gpu_s / SECONDS_PER_HOUR))
    if budget.max_dollars is not None:
        if ledger.dollars is None or next_usd is None:
            warnings.append("spec.budget.maxDollars cannot be checked: a GPU type of this "
                            "job has no price (see the cost warnings); maxGpuHours still "
                            "applies")
        else:
            limits.append(("maxDollars", budget.max_dollars, ledger.dollars, next_usd))
    if not limits:
        return BudgetCheck(warnings=tuple(warnings))
    used = max(spent / limit for _, limit, spent, _ in limits)
    for name, limit, spent, nxt in limits:
        if spent + nxt > limit or spent >= limit:
            unit = "GPU-hours" if name == "maxGpuHours" else "dollars"
            message = (f"spec.budget.{name}: {_fmt(spent)} of {_fmt(limit)} {unit} spent "
                       f"after {ledger.steps} steps; the next step would need about "
                       f"{_fmt(nxt)} more ({_basis(ledger)}). "
                       f"Raise spec.budget.{name} to continue.")
            return BudgetCheck(True, message, used, tuple(warnings))
    return BudgetCheck(False, "", used, tuple(warnings))


def _basis(ledger: Ledger) -> str:
    recent = f"the largest of the last {len(ledger.recent)}"
    return recent + " and the plan for the next" if ledger.planned else recent


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def cost_status(ledger: Ledger) -> dict[str, Any]:
    """`status.cost` of an RLHFJob: totals so far, per stage, and the serverful comparison."""
    stages = {stage: {"gpuSeconds": round(seconds, 3),
                      **({"dollars": round(ledger.stage_dollars[stage], 6)}
                         if stage in ledger.stage_dollars else {})}
              for stage, seconds in sorted(ledger.stage_gpu_seconds.items())}
    status: dict[str, Any] = {
        "gpuSeconds": round(ledger.gpu_seconds, 3),
        "stages": stages,
        "serverfulGpuSeconds": round(ledger.serverful_gpu_seconds, 3),
    }
    if ledger.dollars is not None and ledger.steps:
        status["dollars"] = round(ledger.dollars, 6)
    if ledger.serverful_dollars is not None and ledger.steps:
        status["serverfulDollars"] = round(ledger.serverful_dollars, 6)
    next_gpu_s, next_usd = ledger.next_step()
    if ledger.steps:
        status["nextStepGpuSeconds"] = round(next_gpu_s, 3)
        if next_usd is not None:
            status["nextStepDollars"] = round(next_usd, 6)
    return status
