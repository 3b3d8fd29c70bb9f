"""RLHFJob status as pure data: phases, standard conditions and the patch for each event.

A condition's `lastTransitionTime` moves only when its status flips (the Kubernetes
convention), so `kubectl wait --for=condition=Complete` and dashboards see real transitions.
Every function returns the whole status patch, conditions included, because a JSON merge
patch replaces lists wholesale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rlhfless.api.progress import StepSummary

READY = "Ready"
RUNNING = "Running"
SUSPENDED = "Suspended"
COMPLETE = "Complete"
BUDGET_EXCEEDED = "BudgetExceeded"
CONDITION_TYPES = (READY, RUNNING, SUSPENDED, COMPLETE, BUDGET_EXCEEDED)

# Reasons (CamelCase, stable: tooling matches on them).
INVALID_SPEC = "InvalidSpec"
SERVICES_CREATED = "ServicesCreated"
STEP_COMPLETED = "StepCompleted"
STARTING = "Starting"
SUSPEND_REQUESTED = "SuspendRequested"
NOT_SUSPENDED = "NotSuspended"
STEPS_REACHED = "StepsReached"
IN_PROGRESS = "InProgress"
DRIVER_ERROR = "DriverError"
NEXT_STEP_OVER_BUDGET = "NextStepOverBudget"
WITHIN_BUDGET = "WithinBudget"


@dataclass(frozen=True)
class Cond:
    type: str
    status: bool
    reason: str
    message: str


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(current: Iterable[dict[str, Any]], updates: Iterable[Cond],
                     generation: int | None, now: str) -> list[dict[str, Any]]:
    """`current` with each update applied; untouched types keep their entries."""
    by_type = {c["type"]: dict(c) for c in current if c.get("type")}
    for u in updates:
        status = "True" if u.status else "False"
        old = by_type.get(u.type)
        changed = old is None or old.get("status") != status
        entry: dict[str, Any] = {
            "type": u.type,
            "status": status,
            "reason": u.reason,
            "message": u.message[:32768],
            "lastTransitionTime": now if changed else old.get("lastTransitionTime", now),
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        by_type[u.type] = entry
    ordered = [by_type.pop(t) for t in CONDITION_TYPES if t in by_type]
    return ordered + list(by_type.values())


def _status(current: Iterable[dict[str, Any]], phase: str, generation: int | None,
            updates: Iterable[Cond], now: str | None, **fields: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": merge_conditions(current, updates, generation, now or now_rfc3339()),
        **fields,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def invalid_spec(current: Iterable[dict[str, Any]], errors: list[str],
                 generation: int | None, now: str | None = None) -> dict[str, Any]:
    message = "invalid spec: " + "; ".join(errors)
    return _status(current, "Failed", generation, [
        Cond(READY, False, INVALID_SPEC, message),
        Cond(RUNNING, False, INVALID_SPEC, "fix the spec to start the job"),
    ], now)


def started(current: Iterable[dict[str, Any]], services: list[str], driver: str, step: int,
            steps: int, generation: int | None, now: str | None = None,
            has_budget: bool = False) -> dict[str, Any]:
    """Running; a job with a budget (or one stopped by it before) gets BudgetExceeded=False."""
    current = list(current)
    updates = [
        Cond(READY, True, SERVICES_CREATED,
             f"{len(services)} Knative Services: {', '.join(services)}; driver Job {driver}"),
        Cond(RUNNING, True, STARTING, f"driver starting after step {step} of {steps}"),
        Cond(SUSPENDED, False, NOT_SUSPENDED, "spec.suspend is false"),
        Cond(COMPLETE, False, IN_PROGRESS, f"{step} of {steps} steps done"),
    ]
    if has_budget or condition({"conditions": current}, BUDGET_EXCEEDED) is not None:
        updates.append(Cond(BUDGET_EXCEEDED, False, WITHIN_BUDGET,
                            "the next step fits spec.budget" if has_budget
                            else "spec.budget sets no limit"))
    return _status(current, "Running", generation, updates, now, step=step)


def step_done(current: Iterable[dict[str, Any]], record: StepSummary, steps: int,
              checkpoint: str, generation: int | None, now: str | None = None,
              cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """After a step the driver reported; `checkpoint` is its file, relative to the volume;
    `cost` is `status.cost` (rlhfless.cost.cost_status) when known. A non-finite reward (a
    JSON status cannot hold NaN) is left out."""
    fields: dict[str, Any] = {"step": record.step, "weightsVersion": int(record.weights_version),
                              "costGpuSeconds": round(float(record.gpu_seconds_total), 3),
                              "checkpoint": checkpoint}
    if math.isfinite(record.reward):
        fields["reward"] = float(record.reward)
    if cost is not None:
        fields["cost"] = cost
    return _status(current, "Running", generation, [
        Cond(RUNNING, True, STEP_COMPLETED, f"step {record.step} of {steps} done"),
        Cond(COMPLETE, False, IN_PROGRESS, f"{record.step} of {steps} steps done"),
    ], now, **fields)


def budget_exceeded(current: Iterable[dict[str, Any]], step: int, message: str,
                    generation: int | None, now: str | None = None,
                    cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """Suspended by spec.budget after `step`: raising the budget resumes the job."""
    extra = {} if cost is None else {"cost": cost}
    return _status(current, "Suspended", generation, [
        Cond(RUNNING, False, NEXT_STEP_OVER_BUDGET, f"stopped after step {step}: {message}"),
        Cond(SUSPENDED, True, NEXT_STEP_OVER_BUDGET,
             f"stopped after step {step} by spec.budget; functions scaled to zero"),
        Cond(BUDGET_EXCEEDED, True, NEXT_STEP_OVER_BUDGET, message),
    ], now, step=step, **extra)


def suspended(current: Iterable[dict[str, Any]], step: int, generation: int | None,
              now: str | None = None) -> dict[str, Any]:
    return _status(current, "Suspended", generation, [
        Cond(RUNNING, False, SUSPEND_REQUESTED, f"stopped after step {step}"),
        Cond(SUSPENDED, True, SUSPEND_REQUESTED,
             f"stopped after step {step}; functions scaled to zero"),
    ], now, step=step)


def succeeded(current: Iterable[dict[str, Any]], step: int, generation: int | None,
              now: str | None = None) -> dict[str, Any]:
    return _status(current, "Succeeded", generation, [
        Cond(RUNNING, False, STEPS_REACHED, f"all {step} steps done"),
        Cond(COMPLETE, True, STEPS_REACHED, f"all {step} steps done"),
    ], now, step=step)


def failed(current: Iterable[dict[str, Any]], error: str, generation: int | None,
           retry_in_s: float | None, now: str | None = None) -> dict[str, Any]:
    retry = f" (retrying in {retry_in_s:.0f}s)" if retry_in_s is not None else ""
    return _status(current, "Failed", generation, [
        Cond(READY, False, DRIVER_ERROR, f"{error}{retry}"),
        Cond(RUNNING, False, DRIVER_ERROR, f"{error}{retry}"),
    ], now)


def condition(status: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for entry in (status or {}).get("conditions") or []:
        if entry.get("type") == type_:
            return entry
    return None
