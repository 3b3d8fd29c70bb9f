"""Scheduling policies: pure functions of numbers (lengths, profiles, prices), no I/O.

Shared by the driver and the simulator. One module per job:

* `predictor` — `LengthPredictor` (per-prompt EWMA, running-quantile fallback, state_dict),
  `prediction_error` (MAE, Spearman).
* `planning` — the planner's inputs, shared by driver and simulator: `GroupLengthPredictor`
  (mean and longest per group), `planning_workload` (the units, KV reads included),
  `prewarm_margin`, `ewma`, `RatioTracker` (recent actual / planned).
* `profile` — `Profile` (tpot(b) = a + c·b, prefill rate, cold start, keep-alive, GPUs,
  batch cap, batching mode) and `ProfileEstimator` (online fit from measurements).
* `workmodel` — `Workload` units, bin time, makespan, lower bounds, per-unit finish times (the
  time model; optional KV-read and KV-capacity terms).
* `assign` — `assign(pred_lengths_per_group, n_bins, profile, group_size, policy, seed)`:
  "length-aware" | "round-robin" | "random".
* `scaling` — `choose_actor_count(...)` → `ScalingDecision(n, table, bins, ...)` by λ.
* `migrate` — `should_cut`, `cut_threshold`, `handoff_target`, `remaining_estimate`,
  `plan_migration`.
* `handoff` — `handoff_estimate`: the streaming step's hand-off cut on the time model.
* `learner` — the fused learner: `LearnerProfile`, `plan_learner` (size, just-in-time start),
  `learner_start`, `learner_queue`, `ArrivalCurve`, `free_gpu_curve`.
* `step` — `plan_step`: actors and learner of one streaming step chosen together by λ.
* `prewarm` — `prewarm_plan(phase_durations, cold_starts)` → start times and releases;
  `keep_or_prewarm` per instance.
* `cost` — planned and measured GPU-seconds, idle ratio.
"""

from rlhfless.scheduling.assign import POLICIES, assign, assign_workload
from rlhfless.scheduling.cost import (
    CostBreakdown,
    Lifetime,
    cost_breakdown,
    planned_gpu_seconds,
    union_length,
)
from rlhfless.scheduling.handoff import HandoffEstimate, handoff_estimate
from rlhfless.scheduling.learner import (
    ArrivalCurve,
    LearnerPlan,
    LearnerProfile,
    free_gpu_curve,
    learner_queue,
    learner_start,
    plan_learner,
)
from rlhfless.scheduling.migrate import (
    MigrationPlan,
    cut_threshold,
    handoff_target,
    plan_migration,
    remaining_estimate,
    should_cut,
)
from rlhfless.scheduling.planning import (
    GroupLengthPredictor,
    RatioTracker,
    ewma,
    planning_workload,
    prewarm_margin,
)
from rlhfless.scheduling.predictor import LengthPredictor, prediction_error, spearman
from rlhfless.scheduling.prewarm import (
    DEFAULT_PHASES,
    PrewarmPlan,
    keep_or_prewarm,
    prewarm_plan,
)
from rlhfless.scheduling.profile import Profile, ProfileEstimator
from rlhfless.scheduling.scaling import (
    ScalingDecision,
    ScalingRow,
    choose_actor_count,
    step_time,
)
from rlhfless.scheduling.step import StepPlan, plan_step
from rlhfless.scheduling.workmodel import (
    Workload,
    bin_time,
    bin_times,
    lower_bound,
    makespan,
    simple_lower_bound,
    unit_finish_times,
)

__all__ = [
    "DEFAULT_PHASES",
    "POLICIES",
    "ArrivalCurve",
    "CostBreakdown",
    "GroupLengthPredictor",
    "HandoffEstimate",
    "LearnerPlan",
    "LearnerProfile",
    "LengthPredictor",
    "Lifetime",
    "MigrationPlan",
    "PrewarmPlan",
    "Profile",
    "ProfileEstimator",
    "RatioTracker",
    "ScalingDecision",
    "ScalingRow",
    "StepPlan",
    "Workload",
    "assign",
    "assign_workload",
    "bin_time",
    "bin_times",
    "choose_actor_count",
    "cost_breakdown",
    "cut_threshold",
    "ewma",
    "free_gpu_curve",
    "handoff_estimate",
    "keep_or_prewarm",
    "learner_queue",
    "learner_start",
    "handoff_target",
    "lower_bound",
    "makespan",
    "plan_learner",
    "plan_migration",
    "plan_step",
    "planning_workload",
    "prediction_error",
    "planned_gpu_seconds",
    "prewarm_margin",
    "prewarm_plan",
    "remaining_estimate",
    "should_cut",
    "simple_lower_bound",
    "spearman",
    "step_time",
    "union_length",
    "unit_finish_times",
]
