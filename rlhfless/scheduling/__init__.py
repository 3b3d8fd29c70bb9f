"""Scheduling policies: pure functions of numbers (lengths, profiles, prices), no I/O.

Shared by the driver and the simulator. One module per job:

* `predictor` — `LengthPredictor` (per-prompt EWMA, running-quantile fallback, state_dict),
  `prediction_error` (MAE, Spearman).
* `profile` — `Profile` (tpot(b) = a + c·b, prefill rate, cold start, keep-alive, GPUs,
  batch cap, batching mode) and `ProfileEstimator` (online fit from measurements).
* `workmodel` — `Workload` units, bin time, makespan, lower bounds (the time model).
* `assign` — `assign(pred_lengths_per_group, n_bins, profile, group_size, policy, seed)`:
  "length-aware" | "round-robin" | "random".
* `scaling` — `choose_actor_count(...)` → `ScalingDecision(n, table, bins, ...)` by λ.
* `migrate` — `should_cut`, `cut_threshold`, `handoff_target`, `remaining_estimate`,
  `plan_migration`.
* `prewarm` — `prewarm_plan(phase_durations, cold_starts)` → start times and releases.
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
from rlhfless.scheduling.migrate import (
    MigrationPlan,
    cut_threshold,
    handoff_target,
    plan_migration,
    remaining_estimate,
    should_cut,
)
from rlhfless.scheduling.predictor import LengthPredictor, prediction_error, spearman
from rlhfless.scheduling.prewarm import DEFAULT_PHASES, PrewarmPlan, prewarm_plan
from rlhfless.scheduling.profile import Profile, ProfileEstimator
from rlhfless.scheduling.scaling import (
    ScalingDecision,
    ScalingRow,
    choose_actor_count,
    step_time,
)
from rlhfless.scheduling.workmodel import (
    Workload,
    bin_time,
    bin_times,
    lower_bound,
    makespan,
    simple_lower_bound,
)

__all__ = [
    "DEFAULT_PHASES",
    "POLICIES",
    "CostBreakdown",
    "LengthPredictor",
    "Lifetime",
    "MigrationPlan",
    "PrewarmPlan",
    "Profile",
    "ProfileEstimator",
    "ScalingDecision",
    "ScalingRow",
    "Workload",
    "assign",
    "assign_workload",
    "bin_time",
    "bin_times",
    "choose_actor_count",
    "cost_breakdown",
    "cut_threshold",
    "handoff_target",
    "lower_bound",
    "makespan",
    "plan_migration",
    "prediction_error",
    "planned_gpu_seconds",
    "prewarm_plan",
    "remaining_estimate",
    "should_cut",
    "simple_lower_bound",
    "spearman",
    "step_time",
    "union_length",
]
