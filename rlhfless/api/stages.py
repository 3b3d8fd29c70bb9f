"""The stage table: which stage functions a job has, computed once from its JobSpec.

This is the only answer to "which stages does this job have". The operator's Service
builder, both runtimes, the driver, prewarm, the trainer and the simulator read it, so a
stage the job never calls is never deployed, waited for, or billed.

A step runs its phases in order (rollout → score → train); each stage belongs to one phase.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhfless.api.spec import JobSpec

# Every stage function the code knows, in the order a step calls them.
STAGE_NAMES: tuple[str, ...] = ("actor", "reference", "reward", "critic", "trainer")
PHASES: tuple[str, ...] = ("rollout", "score", "train")
PHASE_OF: dict[str, str] = {
    "actor": "rollout",
    "reference": "score",
    "reward": "score",
    "critic": "score",
    "trainer": "train",
}
# Scoring functions serve a whole step's batch in one request; two instances cover a
# retry while the first still runs. The trainer holds the optimizer: exactly one.
_MAX_SCALE = {"reference": 2, "reward": 2, "critic": 2, "trainer": 1}
# The models an instance holds in memory (memory planning sizes them): "policy" and
# "critic" are trained where the phase is "train", "reference" is always frozen.
_HOLDS: dict[str, tuple[str, ...]] = {
    "actor": ("policy",), "reference": ("reference",), "reward": (), "critic": ("critic",),
    "trainer": ("policy", "critic"),
}


@dataclass(frozen=True)
class Stage:
    name: str
    phase: str  # one of PHASES
    max_scale: int  # most instances the platform may run at once
    gpus: int  # per instance
    deployed: bool  # False: the job never calls it (no Service, no process, no bill)
    holds: tuple[str, ...] = ()  # models in the instance's memory (of those the job has)


@dataclass(frozen=True)
class StageTable:
    stages: tuple[Stage, ...]

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __getitem__(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")

    @property
    def deployed(self) -> tuple[str, ...]:
        """Names of the stages this job runs, in step order."""
        return tuple(s.name for s in self.stages if s.deployed)

    def has(self, name: str) -> bool:
        return name in self.deployed

    def phases(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(phase, deployed stages) in step order: the cycle prewarm plans over."""
        return tuple((phase, tuple(s.name for s in self.stages
                                   if s.deployed and s.phase == phase)) for phase in PHASES)


def stage_table(spec: JobSpec) -> StageTable:
    """The stages of a job: the reference only when the KL term uses it (klBeta > 0), the
    critic only for PPO; actors scale up to `scheduling.maxActors`."""
    algo = spec.algorithm
    deployed = {
        "actor": True,
        "reference": algo.kl_beta > 0,
        "reward": True,
        "critic": algo.name == "ppo",
        "trainer": True,
    }
    max_scale = {**_MAX_SCALE, "actor": spec.scheduling.max_actors}
    models = {"policy", "reference" if deployed["reference"] else "",
              "critic" if deployed["critic"] else ""}
    return StageTable(tuple(
        Stage(name=name, phase=PHASE_OF[name], max_scale=max_scale[name],
              gpus=getattr(spec.resources, name).gpus, deployed=deployed[name],
              holds=tuple(m for m in _HOLDS[name] if m in models))
        for name in STAGE_NAMES
    ))
