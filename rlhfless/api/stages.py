"""The stage table: which stage functions a job has, computed once from its JobSpec.

This is the only answer to "which stages does this job have". The operator's Service
builder, both runtimes, the driver, prewarm, the trainer and the simulator read it, so a
stage the job never calls is never deployed, waited for, or billed.

Rewards are scored by one of two stages: `reward` (rules on decoded text, no model) or,
when `reward.name` is `reward_model`, `scorer` (a sequence-classification model). A job
deploys exactly one of them; `StageTable.reward_stage` names it, and the driver sends its groups
there.

A step has two phases on its critical path: `rollout` (until the last actor finished) and
`learn` (what is left after it: the last groups' rewards and learner adds, then `finish`).
In a streaming step the learn stages already work during the rollout, on each group as it
finishes; the phases are what prewarm plans over.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhfless.api.spec import JobSpec

# Every stage function the code knows, in the order a step calls them.
STAGE_NAMES: tuple[str, ...] = ("actor", "reward", "scorer", "learner")
PHASES: tuple[str, ...] = ("rollout", "learn")
PHASE_OF: dict[str, str] = {
    "actor": "rollout",
    "reward": "learn",
    "scorer": "learn",
    "learner": "learn",
}
# The stages that turn a group into rewards (one per job, chosen by the reward name).
REWARD_STAGES: tuple[str, ...] = ("reward", "scorer")
# The reward name that selects the `scorer` stage (a reward model instead of rules).
REWARD_MODEL = "reward_model"
# Two reward (or scorer) instances score groups side by side while others still stream in.
# The learner holds the step's accumulated gradient and the optimizer: exactly one.
_MAX_SCALE = {"reward": 2, "scorer": 2, "learner": 1}


@dataclass(frozen=True)
class Stage:
    name: str
    phase: str  # one of PHASES
    max_scale: int  # most instances the platform may run at once
    gpus: int  # per instance
    deployed: bool  # False: the job never calls it (no Service, no process, no bill)
    holds: tuple[str, ...] = ()  # models in the instance's memory (memory planning sizes them)

    @property
    def ranks(self) -> int:
        """Processes of one instance: a learner with `gpus: N > 1` runs N training ranks,
        one per GPU (rlhfless.train.ranks); every other instance is one process."""
        return max(1, self.gpus) if self.name == "learner" else 1


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

    @property
    def reward_stage(self) -> str:
        """The deployed stage that scores groups (`reward` or `scorer`)."""
        return next(s.name for s in self.stages if s.deployed and s.name in REWARD_STAGES)

    def phases(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(phase, deployed stages) in step order: the cycle prewarm plans over."""
        return tuple((phase, tuple(s.name for s in self.stages
                                   if s.deployed and s.phase == phase)) for phase in PHASES)


def _scoring_stage(spec: JobSpec) -> str:
    """The stage that scores this job's groups: `scorer` for a reward model, else `reward`."""
    return "scorer" if spec.reward.name == REWARD_MODEL else "reward"


def stage_table(spec: JobSpec) -> StageTable:
    """The stages of a job: actors (up to `scheduling.maxActors`), its reward stage (rules or
    a reward model: `_scoring_stage`), and the learner, which holds the policy, the frozen
    reference (only when klBeta > 0: see `learner_parts`) and, for PPO, the critic.

    The scorer's reward model is not in `holds`: `holds` lists models shaped like the
    policy; the memory plan sizes the reward model from its own config.json
    (`rlhfless.model.fit`)."""
    max_scale = {**_MAX_SCALE, "actor": spec.scheduling.max_actors}
    holds = {"actor": ("policy",), "reward": (), "scorer": (), "learner": learner_parts(spec)}
    scores = _scoring_stage(spec)
    return StageTable(tuple(
        Stage(name=name, phase=PHASE_OF[name], max_scale=max_scale[name],
              gpus=getattr(spec.resources, name).gpus,
              deployed=name not in REWARD_STAGES or name == scores, holds=holds[name])
        for name in STAGE_NAMES
    ))


def learner_parts(spec: JobSpec) -> tuple[str, ...]:
    """The models one learner instance holds: the policy, the frozen reference (version 0)
    only when the KL term reads it, the critic only for PPO."""
    algo = spec.algorithm
    return ("policy",) + (("reference",) if algo.kl_beta > 0 else ()) + (
        ("critic",) if algo.name == "ppo" else ())
