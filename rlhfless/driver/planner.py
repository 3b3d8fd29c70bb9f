"""The driver's planning state: the scheduling policies wired to the spec's switches.

Everything decided here comes from `rlhfless.scheduling` (pure functions of numbers); this
class only keeps what they learn between steps (length predictor, performance profile, phase
durations, cold starts), turns spec switches into policy arguments, and logs each decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhfless.api.spec import JobSpec
from rlhfless.driver.rollout import PromptItem, RolloutResult
from rlhfless.runtime.base import InstanceUsage
from rlhfless.scheduling.assign import assign
from rlhfless.scheduling.predictor import LengthPredictor, prediction_error
from rlhfless.scheduling.prewarm import PrewarmPlan, prewarm_plan
from rlhfless.scheduling.profile import Profile, ProfileEstimator
from rlhfless.scheduling.scaling import choose_actor_count

PHASE_EWMA = 0.5


@dataclass
class RolloutPlan:
    n_actors: int
    bins: list[list[int]]
    predicted: list[float]
    decisions: dict[str, float] = field(default_factory=dict)


def _ewma(old: float | None, new: float, alpha: float = PHASE_EWMA) -> float:
    return new if old is None else alpha * new + (1 - alpha) * old


class Planner:
    def __init__(self, spec: JobSpec, state: dict[str, Any] | None = None):
        self.spec = spec
        sched = spec.scheduling
        self.predictor = LengthPredictor(alpha=sched.ewma_alpha,
                                         prior=spec.generation.max_new_tokens / 2)
        self.profile = ProfileEstimator(prior=Profile(
            keep_alive_s=sched.keep_alive_s, gpus_per_actor=spec.resources.actor.gpus,
        ))
        self.phase_s: dict[str, float] = {}
        self.cold_start_s: dict[str, float] = {}
        self.last_plan: RolloutPlan | None = None
        self._prompt_len: dict[str, int] = {}
        if state:
            self.load_state_dict(state)

    # -- 1. plan -------------------------------------------------------------------------
    def plan(self, items: Sequence[PromptItem], warm_actors: int = 0) -> RolloutPlan:
        sched, g = self.spec.scheduling, self.spec.algorithm.group_size
        keys = [i.key for i in items]
        self._prompt_len = {i.key: len(i.prompt_ids) for i in items}
        prompt_tokens = [len(i.prompt_ids) for i in items]
        if sched.length_prediction:
            predicted = self.predictor.predict(keys)
        else:
            # Without prediction every prompt looks the same: the worst case, max length.
            predicted = np.full(len(keys), float(self.spec.generation.max_new_tokens))
        profile = self.profile.profile()
        decisions: dict[str, float] = {}
        if sched.cost_aware:
            decision = choose_actor_count(
                predicted, g, profile, sched.lam, sched.max_actors, prompt_tokens,
                warm=warm_actors, policy=sched.assignment, seed=self.spec.seed,
            )
            n, bins = decision.n, decision.bins
            for row in decision.table:
                decisions[f"sched/table/n{row.n}/time_s"] = row.time_s
                decisions[f"sched/table/n{row.n}/gpu_seconds"] = row.gpu_seconds
                decisions[f"sched/table/n{row.n}/score"] = row.score
        else:
            n = min(sched.actors, len(keys))
            bins = assign(predicted, n, profile, g, sched.assignment, self.spec.seed,
                          prompt_tokens)
        decisions.update({
            "sched/actors": float(n),
            "sched/warm_actors": float(warm_actors),
            "sched/profile/tpot_base_s": profile.tpot_base_s,
            "sched/profile/tpot_per_seq_s": profile.tpot_per_seq_s,
            "sched/profile/cold_start_s": profile.cold_start_s,
        })
        self.last_plan = RolloutPlan(n, [list(b) for b in bins], predicted.tolist(), decisions)
        return self.last_plan

    # -- 5. learn from what happened -----------------------------------------------------
    def observe(self, items: Sequence[PromptItem], rollout: RolloutResult,
                usages: Iterable[InstanceUsage], phase_work_s: dict[str, float],
                t0: float) -> dict[str, float]:
        """Learn lengths, the actor profile, cold starts and phase durations from a step."""
        metrics: dict[str, float] = {}
        keys = [i.key for i in items]
        actual = [float(np.mean([s.response.size for s in rollout.samples[k]])) for k in keys]
        if self.last_plan is not None and self.spec.scheduling.length_prediction:
            err = prediction_error(self.last_plan.predicted, actual)
            metrics["sched/pred_mae_tokens"] = err["mae"]
            if np.isfinite(err["spearman"]):
                metrics["sched/pred_spearman"] = err["spearman"]
        self.predictor.update(keys, actual)
        for stats in rollout.actor_stats:
            self.profile.observe_generation(
                stats.get("generate_s", 0.0), stats.get("decode_steps", 0.0),
                stats.get("tokens", 0.0), stats.get("prompt_tokens", 0.0),
            )
        for u in usages:
            if u.started_at >= t0:
                if u.stage == "actor":
                    self.profile.observe_cold_start(u.cold_start_s)
                self.cold_start_s[u.stage] = _ewma(self.cold_start_s.get(u.stage),
                                                   u.cold_start_s)
        for phase, seconds in phase_work_s.items():
            self.phase_s[phase] = _ewma(self.phase_s.get(phase), seconds)
        metrics["sched/migrated_samples"] = float(rollout.migrated)
        metrics["sched/migration_actors"] = float(rollout.migration_actors)
        return metrics

    def prewarm(self) -> PrewarmPlan:
        return prewarm_plan(self.phase_s, self.cold_start_s, phases=self.spec.stages.phases())

    # -- checkpoint ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "predictor": self.predictor.state_dict(),
            "profile": self.profile.state_dict(),
            "phase_s": self.phase_s,
            "cold_start_s": self.cold_start_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.predictor.load_state_dict(state["predictor"])
        self.profile.load_state_dict(state["profile"])
        self.phase_s = dict(state.get("phase_s", {}))
        self.cold_start_s = dict(state.get("cold_start_s", {}))
