"""What a job's daemon does next, as a pure function of what it knows.

The daemon observes (spec valid? suspended? steps checkpointed? over budget? the driver
Job's state? failures in a row?) and acts; the choice between acting lives here, so it is
tested without kopf or a cluster, like `status.py`. The driver runs in its own pod (a
`batch/v1` Job); the operator only starts it, stops it (gracefully: the step in flight
finishes first), and reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class DriverState(Enum):
    ABSENT = "absent"  # no driver Job
    RUNNING = "running"  # a Job whose pod runs (or is about to)
    STOPPING = "stopping"  # deleted, its pod finishing the step in flight
    FINISHED = "finished"  # the pod exited (succeeded or failed); no pod runs


class Action(Enum):
    INVALID = "invalid"  # report the spec errors; wait for a new spec
    SUSPEND = "suspend"  # scale every stage to zero; report Suspended
    SUCCEEDED = "succeeded"  # all steps done; report Succeeded
    BUDGET = "budget-exceeded"  # the next step would cross spec.budget: scale to zero, report
    START = "start"  # create the driver Job: it resumes from the checkpoint
    WATCH = "watch"  # the driver runs: report its progress
    STOP = "stop"  # delete the driver Job (its pod finishes its step first)
    WAIT = "wait"  # a driver is stopping: nothing starts until it is gone
    RETRY = "retry"  # the last run failed: report it, back off, then start again
    GIVE_UP = "give-up"  # failed too often in a row: wait for a spec change


@dataclass(frozen=True)
class JobView:
    valid: bool
    suspend: bool = False
    steps_done: int = 0  # checkpointed steps
    steps: int = 0
    driver: DriverState = DriverState.ABSENT
    driver_current: bool = True  # the Job was built from the job's current spec
    failures: int = 0  # failed runs in a row not yet retried (0 once a retry is due)
    max_retries: int = 5
    # rlhfless.cost.check_budget of the spend the driver published, against the current
    # spec.budget (raising it is a spec change that lets the job go on)
    over_budget: bool = False


def decide(view: JobView) -> Action:
    if view.driver is DriverState.STOPPING:
        return Action.WAIT  # never two drivers on one job's store
    running = view.driver is DriverState.RUNNING
    if not view.valid:
        return Action.STOP if running else Action.INVALID
    if view.suspend:
        return Action.STOP if running else Action.SUSPEND
    if view.steps_done >= view.steps:
        return Action.SUCCEEDED  # a driver still running only scales down and exits
    if view.over_budget and not running:
        return Action.BUDGET  # a running driver stops itself at the budget, checkpointed
    if running:
        return Action.WATCH if view.driver_current else Action.STOP
    if view.failures > view.max_retries:
        return Action.GIVE_UP
    if view.failures > 0:
        return Action.RETRY
    # A finished Job keeps its name: it goes before a new driver is created.
    return Action.START if view.driver is DriverState.ABSENT else Action.STOP
