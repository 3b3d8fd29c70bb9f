"""The driver's planning state: the scheduling policies wired to the spec's switches.

Everything decided here comes from `rlhfless.scheduling`, the same code the simulator runs
(pure functions of numbers): the planning inputs of `scheduling.planning` (each group's mean
and longest-sample EWMAs, the context term, the prewarm margin) and `plan_step`, which
chooses the actor count with the fused learner beside it. This class only keeps what they
learn between steps (length predictors, the actor profile, the learner's speed, the shape of
group arrivals, how long rollouts really take against the plan, phase durations, cold
starts), turns spec switches into policy arguments, and logs each decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhfless.api.spec import JobSpec
from rlhfless.driver.rollout import PromptItem, RolloutResult
from rlhfless.runtime.base import InstanceUsage
from rlhfless.scheduling.learner import ArrivalCurve, LearnerProfile
from rlhfless.scheduling.planning import (
    GroupLengthPredictor,
    RatioTracker,
    ewma,
    planning_workload,
    prewarm_margin,
)
from rlhfless.scheduling.predictor import prediction_error
from rlhfless.scheduling.prewarm import PrewarmPlan, prewarm_plan
from rlhfless.scheduling.profile import Profile, ProfileEstimator
from rlhfless.scheduling.step import StepPlan, plan_step
from rlhfless.scheduling.units import BinEntry, bin_entries

# Until a learner has been measured: seconds per token it works on (prompt once + responses,
# every pass). Deliberately small: it only places the learner in the first step's plan.
LEARNER_S_PER_TOKEN_PRIOR = 1e-4
# A plan's rollout time counts for the ratio only when most of its lengths were predicted.
KNOWN_FOR_RATIO = 0.5


@dataclass
class RolloutPlan:
    n_actors: int
    bins: list[list[BinEntry]]  # per actor: group indices, or (index, samples) for a part
    predicted: list[float]  # each prompt's predicted mean response length
    rollout_s: float  # predicted rollout seconds (corrected by the measured ratio)
    model_rollout_s: float  # the time model's own prediction (what the ratio corrects)
    decisions: dict[str, float] = field(default_factory=dict)
    known: float = 0.0  # share of the prompts whose lengths were predicted from data


class Planner:
    def __init__(self, spec: JobSpec, state: dict[str, Any] | None = None):
        self.spec = spec
        sched = spec.scheduling
        self.predictor = GroupLengthPredictor(alpha=sched.ewma_alpha,
                                              prior=spec.generation.max_new_tokens / 2)
        self.profile = ProfileEstimator(prior=Profile(
            keep_alive_s=sched.keep_alive_s, gpus_per_actor=spec.resources.actor.gpus,
        ))
        self.ratio = RatioTracker()
        self.arrivals = ArrivalCurve()
        self.learner_s_per_token: float | None = None
        self.learner_finish_s: float | None = None
        self.phase_s: dict[str, float] = {}
        self.cold_start_s: dict[str, float] = {}
        self.last_plan: RolloutPlan | None = None
        if state:
            self.load_state_dict(state)

    # -- 1. plan -------------------------------------------------------------------------
    def plan(self, items: Sequence[PromptItem], warm_actors: int = 0) -> RolloutPlan:
        g = self.spec.algorithm.group_size
        step, mean, known, profile = self._plan_step(items, warm_actors)
        rollout_s = self.ratio.correct(step.rollout_s)
        decisions: dict[str, float] = {}
        for row in step.table:
            decisions[f"sched/table/n{row.n}/time_s"] = row.time_s
            decisions[f"sched/table/n{row.n}/gpu_seconds"] = row.gpu_seconds
            decisions[f"sched/table/n{row.n}/score"] = row.score
            decisions[f"sched/table/n{row.n}/rollout_s"] = row.rollout_s
        decisions.update({
            "sched/actors": float(step.n),
            "sched/split_groups": float(len({u.group for u in step.units
                                             if len(u.samples) < g})),
            "sched/warm_actors": float(warm_actors),
            "sched/plan/rollout_s": rollout_s,
            "sched/plan/step_s": float(step.learner.end_s),
            "sched/plan/known_lengths": known,
            "sched/profile/tpot_base_s": profile.tpot_base_s,
            "sched/profile/tpot_per_seq_s": profile.tpot_per_seq_s,
            "sched/profile/tpot_per_ctx_s": profile.tpot_per_ctx_s,
            "sched/profile/cold_start_s": profile.cold_start_s,
        })
        self.last_plan = RolloutPlan(step.n, bin_entries(step.units, step.bins, g),
                                     mean.tolist(), rollout_s, step.rollout_s, decisions,
                                     known)
        return self.last_plan

    def next_step_gpu_seconds(self, items: Sequence[PromptItem], warm_actors: int = 0) -> float:
        """The plan's GPU-seconds for a step of `items`, as `plan` would choose it (nothing is
        stored: the budget's forecast of the next step)."""
        step, *_ = self._plan_step(items, warm_actors)
        return next(row.gpu_seconds for row in step.table if row.n == step.n)

    def _plan_step(self, items: Sequence[PromptItem], warm_actors: int
                   ) -> tuple[StepPlan, np.ndarray, float, Profile]:
        sched, g = self.spec.scheduling, self.spec.algorithm.group_size
        keys = [i.key for i in items]
        prompt_tokens = np.array([len(i.prompt_ids) for i in items], dtype=float)
        square = None
        if sched.length_prediction:
            mean, longest = self.predictor.predict(keys)
            square = self.predictor.predict_square(keys)
            known = self.predictor.known_fraction(keys)
        else:
            # Without prediction every prompt looks the same: the worst case, max length.
            mean = longest = np.full(len(keys), float(self.spec.generation.max_new_tokens))
            known = 0.0
        caps = np.array([i.max_new_tokens or self.spec.generation.max_new_tokens
                         for i in items], dtype=float)
        mean, longest = np.minimum(mean, caps), np.minimum(longest, caps)
        if square is not None:
            square = np.minimum(square, caps * caps)  # NaN (not yet known) stays NaN
        profile = self.profile.profile()
        step = plan_step(
            planning_workload(mean, longest, g, prompt_tokens, mean_square=square),
            prompt_tokens + g * mean, profile, self._learner(),
            lam=sched.lam, max_actors=min(sched.max_actors, len(keys)), warm=warm_actors,
            handoff_tau=sched.tau if sched.cut_migrate and sched.tau < 1 else None,
            arrival_curve=self.arrivals, margin_s=prewarm_margin(self.cold_start_s),
            policy=sched.assignment, seed=self.spec.seed,
            candidates=None if sched.cost_aware else [min(sched.actors, len(keys))],
            rollout_scale=self.ratio.correct(1.0), split_groups=True,
        )
        return step, mean, known, profile

    def _learner(self) -> LearnerProfile:
        """The fused learner as measured so far (its size is the job's: one instance)."""
        gpus = max(1, self.spec.resources.learner.gpus)
        per_token = self.learner_s_per_token or LEARNER_S_PER_TOKEN_PRIOR
        return LearnerProfile(
            gpu_s_per_token=per_token * gpus,
            init_s=self.cold_start_s.get("learner", self.profile.profile().cold_start_s),
            finish_s=self.learner_finish_s or 0.0, min_gpus=gpus, max_gpus=gpus)

    # -- 2. learn from what happened -----------------------------------------------------
    def observe(self, items: Sequence[PromptItem], rollout: RolloutResult,
                usages: Iterable[InstanceUsage], phase_work_s: dict[str, float],
                t0: float, learn_stats: Mapping[str, float] | None = None) -> dict[str, float]:
        """Learn lengths, the actor profile, the learner's speed, arrivals, how long the
        rollout took against the plan, cold starts and phase durations from a step."""
        metrics: dict[str, float] = {}
        keys = [i.key for i in items]
        lengths = [[float(s.response.size) for s in rollout.samples[k]] for k in keys]
        actual_mean = [float(np.mean(g)) for g in lengths]
        plan = self.last_plan
        rollout_s = max(0.0, rollout.ended_at - t0)
        if plan is not None and self.spec.scheduling.length_prediction:
            err = prediction_error(plan.predicted, actual_mean)
            metrics["sched/pred_mae_tokens"] = err["mae"]
            if np.isfinite(err["spearman"]):
                metrics["sched/pred_spearman"] = err["spearman"]
        if plan is not None and plan.rollout_s > 0 and rollout_s > 0:
            metrics["sched/actual/rollout_s"] = rollout_s
            metrics["sched/plan/rollout_error"] = rollout_s / plan.rollout_s - 1.0
            if plan.known >= KNOWN_FOR_RATIO:  # a plan from guesses says nothing of the model
                self.ratio.observe(plan.model_rollout_s, rollout_s)
        if self.spec.scheduling.length_prediction:
            self.predictor.observe(keys, lengths)
        done = [(rollout.group_done_at[k] - t0, len(item.prompt_ids) + sum(g))
                for k, item, g in zip(keys, items, lengths, strict=True)
                if k in rollout.group_done_at]
        if done and rollout_s > 0:
            self.arrivals.observe([a for a, _ in done], [w for _, w in done], rollout_s)
        for stats in rollout.actor_stats:
            self.profile.observe_generation(
                stats.get("generate_s", 0.0), stats.get("decode_steps", 0.0),
                stats.get("tokens", 0.0), stats.get("prompt_tokens", 0.0),
            )
        self._observe_learner(learn_stats or {}, [len(i.prompt_ids) for i in items], lengths)
        for u in usages:
            if u.started_at >= t0:
                if u.stage == "actor":
                    self.profile.observe_cold_start(u.cold_start_s)
                self.cold_start_s[u.stage] = ewma(self.cold_start_s.get(u.stage),
                                                  u.cold_start_s)
        for phase, seconds in phase_work_s.items():
            self.phase_s[phase] = ewma(self.phase_s.get(phase), seconds)
        metrics["sched/migrated_samples"] = float(rollout.migrated)
        metrics["sched/migration_actors"] = float(rollout.migration_actors)
        return metrics

    def _observe_learner(self, stats: Mapping[str, float], prompt_lens: Sequence[int],
                         lengths: Sequence[Sequence[float]]) -> None:
        """Seconds per token of the learner's work on groups (adds, reference pass, the
        update) and of its finish, from the learner's own account of the step."""
        tokens = float(sum(prompt_lens)) + float(sum(map(sum, lengths)))
        work_s = sum(float(stats.get(k, 0.0)) for k in ("add_s", "ref_s", "update_s"))
        if tokens > 0 and work_s > 0:
            self.learner_s_per_token = ewma(self.learner_s_per_token, work_s / tokens)
        if float(stats.get("update_s", 0.0)) > 0:
            self.learner_finish_s = ewma(self.learner_finish_s, float(stats["update_s"]))

    def prewarm(self) -> PrewarmPlan:
        return prewarm_plan(self.phase_s, self.cold_start_s, phases=self.spec.stages.phases(),
                            margin_s=prewarm_margin(self.cold_start_s))

    # -- checkpoint ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "predictor": self.predictor.state_dict(),
            "profile": self.profile.state_dict(),
            "ratio": self.ratio.state_dict(),
            "arrivals": self.arrivals.state_dict(),
            "learner_s_per_token": self.learner_s_per_token,
            "learner_finish_s": self.learner_finish_s,
            "phase_s": self.phase_s,
            "cold_start_s": self.cold_start_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.predictor.load_state_dict(state["predictor"])
        self.profile.load_state_dict(state["profile"])
        if "ratio" in state:  # checkpoints of earlier versions carry neither
            self.ratio.load_state_dict(state["ratio"])
        if "arrivals" in state:
            self.arrivals.load_state_dict(state["arrivals"])
        self.learner_s_per_token = state.get("learner_s_per_token")
        self.learner_finish_s = state.get("learner_finish_s")
        self.phase_s = dict(state.get("phase_s", {}))
        self.cold_start_s = dict(state.get("cold_start_s", {}))
