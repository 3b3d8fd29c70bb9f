"""What a job's daemon does next, as a pure function of what it knows.

The daemon observes (spec valid? suspended? steps done? over budget? failures in a row?)
and acts; the choice between acting lives here, so it is tested without kopf or a cluster,
like `status.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Action(Enum):
    INVALID = "invalid"  # report the spec errors; wait for a new spec
    SUSPEND = "suspend"  # scale every stage to zero; report Suspended
    SUCCEEDED = "succeeded"  # all steps done; report Succeeded
    BUDGET = "budget-exceeded"  # the next step would cross spec.budget: scale to zero, report
    DRIVE = "drive"  # run the driver from the checkpoint
    RETRY = "retry"  # the last run failed: back off, then drive again
    GIVE_UP = "give-up"  # failed too often in a row: wait for a spec change


@dataclass(frozen=True)
class JobView:
    valid: bool
    suspend: bool = False
    steps_done: int = 0
    steps: int = 0
    failures: int = 0  # consecutive failed runs since the spec last changed or a step landed
    max_retries: int = 5
    over_budget: bool = False  # rlhfless.cost.check_budget on the recorded steps


def decide(view: JobView) -> Action:
    if not view.valid:
        return Action.INVALID
    if view.suspend:
        return Action.SUSPEND
    if view.steps_done >= view.steps:
        return Action.SUCCEEDED
    if view.over_budget:
        return Action.BUDGET
    if view.failures == 0:
        return Action.DRIVE
    if view.failures <= view.max_retries:
        return Action.RETRY
    return Action.GIVE_UP
