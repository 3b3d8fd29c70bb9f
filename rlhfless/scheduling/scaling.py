"""Cost-aware actor scaling: how many actor functions to run for one rollout.

For every candidate N in [min_actors, max_actors] (capped at the number of groups, since
more actors than groups would idle) the groups are assigned with the chosen policy and

    T(N) = predicted step time: actors already warm take the longest bins; a bin on a new
           actor starts after the cold start. T = max over actors (cold start if new + bin time).
    C(N) = GPU-seconds: Σ over actors with work of gpus × (cold start if new + bin time +
           keep_alive)  (`rlhfless.scheduling.cost.planned_gpu_seconds`).

and N minimises  score = λ·T/T_ref + (1−λ)·C/C_ref  with T_ref = min_N T(N) and
C_ref = min_N C(N) over the candidates: both terms are ≥ 1, dimensionless, and equal to 1 at
their own optimum, so λ = 1 picks the fastest N, λ = 0 the cheapest, and λ in between trades
relative slowdown against relative extra cost. Ties go to the smaller N (cheaper to run).

The whole table (N, T, C, score) comes back for logging. T(N) ignores cut-and-migrate, which
only shortens the tail; it is a planning estimate, not a promise.

``extra_time_s`` and ``extra_gpu_s`` (default 0) add the rest of the step — e.g. the
learner's time after the rollout and its GPU-seconds — to every candidate's T and C, so λ
trades *step* time against *step* cost rather than the rollout's alone (a fixed learner
cost makes the rollouts' cost differences relatively smaller). The table reports T and C
with them included.

``handoff_tau`` (default None): the rollout runs the streaming hand-off cut at this τ; each
candidate's actor times are then `rlhfless.scheduling.handoff.handoff_estimate`'s release
times (cut actors leave early, receivers carry the moved tails).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from rlhfless.scheduling.assign import LengthAware, Policy, assign_workload
from rlhfless.scheduling.cost import planned_gpu_seconds
from rlhfless.scheduling.handoff import handoff_estimate
from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.workmodel import Workload, as_workload, bin_times


class ScalingRow(NamedTuple):
    n: int
    time_s: float
    gpu_seconds: float
    score: float


@dataclass(frozen=True)
class ScalingDecision:
    n: int
    table: list[ScalingRow]
    bins: list[list[int]]  # the assignment for the chosen n (n lists of group indices)
    t_ref: float
    c_ref: float


def step_time(times: Sequence[float], profile: Profile, warm: int = 0) -> float:
    """Time until the last actor is done; warm actors take the longest bins."""
    busy = sorted((t for t in times if t > 0), reverse=True)
    if not busy:
        return 0.0
    warm = max(0, warm)
    hot = busy[0] if warm > 0 else 0.0
    cold = profile.cold_start_s + busy[warm] if warm < len(busy) else 0.0
    return max(hot, cold)


# The streaming step's planner (`rlhfless.scheduling.step`) trades time for GPU-seconds only
# among plans predicted within this fraction of its fastest: under a fixed GPU quota the
# cost term alone would pick a few long-running actors (half the actors, a quarter slower),
# and a plan's predicted time is accurate to a few percent at best, so 2% is "as fast".
TIME_SLACK = 0.02


def scores(times: np.ndarray, costs: np.ndarray, lam: float,
           time_slack: float | None = None) -> tuple[np.ndarray, float, float]:
    """λ·T/T_ref + (1−λ)·C/C_ref with the minima as references (a zero minimum counts as 1).

    ``time_slack``: candidates predicted more than this fraction slower than the fastest
    score +inf (None: no limit), so λ only trades among the near-fastest plans.
    """
    if not 0 <= lam <= 1:
        raise ValueError("lam must be in [0, 1]")
    if time_slack is not None and time_slack < 0:
        raise ValueError("time_slack must be >= 0")
    t_ref = float(times.min()) or 1.0
    c_ref = float(costs.min()) or 1.0
    score = lam * times / t_ref + (1 - lam) * costs / c_ref
    if time_slack is not None:
        score = np.where(times <= float(times.min()) * (1 + time_slack) + 1e-9, score, np.inf)
    return score, t_ref, c_ref


def best_index(score: np.ndarray) -> int:
    """The first candidate whose score equals the minimum up to rounding (candidates come
    smallest first, so a near-tie goes to the fewer GPUs)."""
    return int(np.flatnonzero(score <= score.min() * (1 + 1e-12))[0])


def choose_from_candidates(work: Workload, candidates: Sequence[int], profile: Profile,
                           lam: float, warm: int = 0, policy: Policy = "length-aware",
                           seed: int = 0, extra_time_s: float = 0.0,
                           extra_gpu_s: float = 0.0,
                           handoff_tau: float | None = None) -> ScalingDecision:
    """Evaluate T and C for each candidate actor count and pick the best score."""
    if len(candidates) == 0:
        raise ValueError("no candidate actor counts")
    if policy == "length-aware":
        # One sort for the whole sweep; bins are materialised for the winner only.
        planner = LengthAware(work, profile)
        splits = [planner.split(n) for n in candidates]
        per_bin = [times for _, times in splits]
    else:
        plans = [assign_workload(work, n, profile, policy, seed) for n in candidates]
        per_bin = [bin_times(work, bins, profile).tolist() for bins in plans]
    if handoff_tau is not None and handoff_tau < 1:
        # Actors are busy until the hand-off estimate releases them (module docstring).
        for i, n in enumerate(candidates):
            bins = (planner.bins_from_cuts(splits[i][0], n) if policy == "length-aware"
                    else plans[i])
            bins = [b for b in bins if len(b)]
            per_bin[i] = handoff_estimate(work, bins, profile, handoff_tau).ends.tolist()
    if extra_time_s < 0 or extra_gpu_s < 0:
        raise ValueError("extra_time_s and extra_gpu_s must be >= 0")
    times = np.array([step_time(t, profile, warm) for t in per_bin]) + extra_time_s
    costs = np.array([planned_gpu_seconds(t, profile, warm) for t in per_bin]) + extra_gpu_s
    score, t_ref, c_ref = scores(times, costs, lam)
    best = best_index(score)
    table = [ScalingRow(int(n), float(t), float(c), float(s))
             for n, t, c, s in zip(candidates, times, costs, score, strict=True)]
    chosen = (planner.bins_from_cuts(splits[best][0], candidates[best])
              if policy == "length-aware" else plans[best])
    return ScalingDecision(n=int(candidates[best]), table=table, bins=chosen,
                           t_ref=t_ref, c_ref=c_ref)


def choose_actor_count(pred_lengths_per_group: Workload | Sequence[float] | np.ndarray,
                       group_size: int, profile: Profile, lam: float, max_actors: int,
                       prompt_tokens: Sequence[float] | np.ndarray | None = None, *,
                       min_actors: int = 1, warm: int = 0, policy: Policy = "length-aware",
                       seed: int = 0, extra_time_s: float = 0.0,
                       extra_gpu_s: float = 0.0,
                       handoff_tau: float | None = None) -> ScalingDecision:
    """Pick N in [min_actors, max_actors] by the λ score (see module docstring)."""
    if min_actors < 1 or max_actors < min_actors:
        raise ValueError("need 1 <= min_actors <= max_actors")
    work = as_workload(pred_lengths_per_group, group_size, prompt_tokens)
    if len(work) == 0:
        raise ValueError("no groups to schedule")
    upper = max(min_actors, min(max_actors, len(work)))
    return choose_from_candidates(work, range(min_actors, upper + 1), profile, lam, warm,
                                  policy, seed, extra_time_s, extra_gpu_s, handoff_tau)
