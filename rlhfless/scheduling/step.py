"""Plan one streaming step: how many actors, which groups each, and the learner beside them.

In a streaming step the actors and the fused learner run at the same time and, under a GPU
quota, share it: every GPU an actor holds is one the learner cannot have until that actor is
released. So the actor count is chosen with the learner, not before it. For each candidate
N (a geometric grid up to ``max_actors``):

1. the units — whole groups, and with ``split_groups`` parts of the groups too long for one
   actor (`rlhfless.scheduling.units`) — are split length-aware (`LengthAware`), warm
   actors taking the longest bins;
2. `handoff_estimate` gives each actor's release and each unit's finish under the
   hand-off cut (τ = ``handoff_tau``; None = no cut); a group arrives at the learner when
   its last unit is done;
3. the learner is planned on those arrivals — or on the measured `ArrivalCurve` stretched
   over the predicted rollout — within the GPUs the actors leave free (`plan_learner`);
4. T = the learner's end (last group done + finish); C = the actors' GPU-seconds (cold
   start unless warm, until released, plus what an actor with nothing left is billed) plus
   the learner's.

N minimises ``λ·T/T_ref + (1−λ)·C/C_ref`` over the candidates (refs: the minima), like
`rlhfless.scheduling.scaling`, among those predicted within ``time_slack`` (default
`TIME_SLACK`, 2%) of the fastest T. The whole table comes back for logging.

``runaway_floor`` (default on) packs and times every bin as if it held the batch's longest
predicted sample: no step ends before that sample anyway, so bins are filled up to it rather
than split finer, and a sample that runs away unpredicted on any actor costs no more than
the plan already allows for. ``split_groups`` lets a group too long for one actor run on
several; it is off by default because ``bins`` then index `StepPlan.units`, not groups (the
driver's planner and the simulator turn it on and read the units; `units.bin_entries`).

``rollout_scale`` (default 1) stretches the predicted rollout — actor releases and group
arrivals — by the measured ratio of actual to predicted rollouts of recent steps
(`rlhfless.scheduling.planning.RatioTracker`) before the learner is planned on it: the
time model's makespan is the longest predicted bin, and the real one is the longest of many
noisy bins, so it runs systematically longer; the learner must be planned on the real one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from rlhfless.scheduling.assign import LengthAware, Policy, assign_workload
from rlhfless.scheduling.handoff import HandoffEstimate, handoff_estimate
from rlhfless.scheduling.learner import (
    ArrivalCurve,
    LearnerPlan,
    LearnerProfile,
    free_gpu_curve,
    plan_learner,
)
from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.scaling import TIME_SLACK, best_index, scores
from rlhfless.scheduling.units import SPLIT_SLACK, SampleUnit, group_finish, sample_units
from rlhfless.scheduling.workmodel import Workload, bin_times


class StepRow(NamedTuple):
    n: int
    learner_gpus: int
    rollout_s: float
    time_s: float
    gpu_seconds: float
    score: float


@dataclass(frozen=True)
class StepPlan:
    n: int
    bins: list[list[int]]  # unit indices per actor, warm actors first (longest bins first)
    offsets: np.ndarray  # predicted ready time of each bin's actor (seconds after the start)
    estimate: HandoffEstimate  # per unit (``finish``) and per actor (``ends``)
    rollout_s: float  # predicted rollout makespan (hand-off cut included, not scaled)
    learner: LearnerPlan
    table: list[StepRow]
    units: list[SampleUnit]  # what each unit index is: a group and its samples

    def unit_bins(self) -> list[list[SampleUnit]]:
        """Per actor, the (group, sample indices) it generates, in the plan's order."""
        return [[self.units[i] for i in b] for b in self.bins]

    @property
    def split(self) -> bool:
        """Whether some group's samples run on more than one unit."""
        return len(self.units) > len({u.group for u in self.units})


def candidate_counts(max_actors: int, min_actors: int = 1, points: int = 32) -> list[int]:
    """A geometric grid over [min_actors, max_actors] (both included)."""
    if min_actors < 1 or max_actors < min_actors:
        raise ValueError("need 1 <= min_actors <= max_actors")
    grid = np.unique(np.rint(np.geomspace(min_actors, max_actors, points)).astype(int))
    return [int(n) for n in grid]


def plan_step(work: Workload, learn_tokens: Sequence[float] | np.ndarray, profile: Profile,
              learner: LearnerProfile, *, lam: float, max_actors: int, min_actors: int = 1,
              warm: int = 0, warm_ready_s: float = 0.0, quota: int | None = None,
              handoff_tau: float | None = None, arrival_curve: ArrivalCurve | None = None,
              report_s: float = 0.0, margin_s: float = 0.0, policy: Policy = "length-aware",
              seed: int = 0, candidates: Sequence[int] | None = None,
              rollout_scale: float = 1.0, split_groups: bool = False,
              runaway_floor: bool = True,
              time_slack: float | None = TIME_SLACK) -> StepPlan:
    """Choose N and the learner together (module docstring).

    ``work``: one unit per group. ``learn_tokens``: predicted tokens the learner processes
    per group (aligned with `work`). ``warm`` actors are ready ``warm_ready_s`` after the
    start, the others after ``profile.cold_start_s``. ``quota``: GPUs the whole step may
    hold at once (None = an unlimited pool). ``report_s``: from a group's last sample to the
    learner.
    """
    tokens = np.asarray(learn_tokens, dtype=float).reshape(-1)
    if rollout_scale <= 0:
        raise ValueError("rollout_scale must be > 0")
    if len(work) == 0:
        raise ValueError("no groups to schedule")
    if len(tokens) != len(work):
        raise ValueError("learn_tokens must align with the work units")
    groups = len(work)
    parts, units = sample_units(work, profile, SPLIT_SLACK if split_groups else None)
    upper = max(min_actors, min(max_actors, len(parts)))
    if quota is not None:
        upper = max(min_actors, min(upper, quota // max(1, profile.gpus_per_actor)))
    grid = candidates or candidate_counts(upper, min_actors)
    packed = parts.with_lmax_floor(float(parts.lmax.max())) if runaway_floor else parts
    splitter = LengthAware(packed, profile) if policy == "length-aware" else None
    rows, plans = [], []
    for n in grid:
        if splitter is not None:
            bins = splitter.bins(n)
        else:
            bins = assign_workload(parts, n, profile, policy, seed)
        bins = [b for b in bins if len(b)]
        times = bin_times(packed, bins, profile)
        order = np.argsort(-times, kind="stable")  # warm actors take the longest bins
        bins = [bins[i] for i in order]
        times = times[order]
        n_warm = min(warm, len(bins))
        offsets = np.array([warm_ready_s] * n_warm
                           + [profile.cold_start_s] * (len(bins) - n_warm))
        est = handoff_estimate(parts, bins, profile, handoff_tau or 1.0, offsets)
        makespan = max(est.makespan, float((times + offsets).max()))
        rollout = makespan * rollout_scale
        scale = rollout_scale
        if arrival_curve is not None and arrival_curve.known:
            arrivals, chunk_tokens = arrival_curve.expected(float(tokens.sum()), rollout)
        else:
            done = group_finish(units, est.finish, groups)
            arrivals, chunk_tokens = done * scale + report_s, tokens
        free = None
        if quota is not None:
            free = free_gpu_curve(est.ends * scale + profile.keep_alive_s,
                                  profile.gpus_per_actor, quota)
        try:
            lplan = plan_learner(arrivals, chunk_tokens, learner, lam=lam, margin_s=margin_s,
                                 free_gpus=free, time_slack=time_slack)
        except ValueError:
            continue  # no learner size fits beside this many actors
        cold = max(0, len(bins) - n_warm) * profile.cold_start_s
        actor_gpu_s = profile.gpus_per_actor * (
            float(np.maximum(est.ends * scale - offsets, 0.0).sum()) + cold
            + len(bins) * profile.keep_alive_s)
        rows.append((n, lplan.gpus, rollout, lplan.end_s, actor_gpu_s + lplan.gpu_seconds))
        plans.append((bins, offsets, est, lplan, makespan))
    if not rows:
        raise ValueError("no actor count leaves room for the learner")
    times = np.array([r[3] for r in rows])
    costs = np.array([r[4] for r in rows])
    score, _, _ = scores(times, costs, lam, time_slack)
    best = best_index(score)
    bins, offsets, est, lplan, makespan = plans[best]
    table = [StepRow(r[0], r[1], r[2], r[3], r[4], float(s))
             for r, s in zip(rows, score, strict=True)]
    return StepPlan(n=len(bins), bins=bins, offsets=offsets, estimate=est,
                    rollout_s=makespan, learner=lplan, table=table, units=units)
