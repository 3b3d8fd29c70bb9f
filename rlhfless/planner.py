"""Planning a step: how many actor functions, and which prompts go to which (placeholder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhfless.api.spec import JobSpec
from rlhfless.functions.schemas import RolloutSample


@dataclass
class RolloutPlan:
    n_actors: int
    bins: list[list[int]]
    decisions: dict[str, float] = field(default_factory=dict)


class Planner:
    def __init__(self, spec: JobSpec, state: dict[str, Any]):
        self.spec = spec

    def plan(self, keys: list[str], prompt_lengths: list[int]) -> RolloutPlan:
        n = min(self.spec.scheduling.actors, len(keys))
        bins = [list(range(i, len(keys), n)) for i in range(n)]
        return RolloutPlan(n, bins, {"sched/actors": float(n)})

    def migration_bins(self, unfinished: list[RolloutSample], remaining: list[int]) -> list[list[int]]:
        return [list(range(len(unfinished)))]

    def observe(self, items, rollout, usages) -> dict[str, float]:  # type: ignore[no-untyped-def]
        return {"sched/actors": float(len(rollout.actor_stats))}

    def state_dict(self) -> dict[str, Any]:
        return {}
