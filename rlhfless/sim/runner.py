"""Run a system for several RL steps on a workload and compare it with the baseline."""

from __future__ import annotations

from dataclasses import dataclass

from rlhfless.sim.config import SimConfig
from rlhfless.sim.results import StepResult, Summary, summarise
from rlhfless.sim.serverless import ServerlessSim
from rlhfless.sim.verl import rlhfuse_step, verl_step
from rlhfless.sim.workload import Workload, synthetic

SYSTEMS = ("verl", "rlhfuse", "rlhfless")


def job_workload(cfg: SimConfig, family: str = "longtail", epochs: int = 4,
                 steps_per_epoch: int = 1, **family_overrides: float) -> Workload:
    """A dataset of `steps_per_epoch` batches, seen `epochs` times (epoch 0 warms the
    length predictor and the measured phase times; summaries use the later epochs, where
    the EWMA weight α also matters from epoch 2 on)."""
    n = cfg.prompts_per_step * steps_per_epoch
    return synthetic(family, n, cfg.group_size, epochs, seed=cfg.seed, **family_overrides)


def run_system(system: str, cfg: SimConfig, w: Workload) -> list[StepResult]:
    steps = list(w.steps(cfg.prompts_per_step, seed=cfg.seed))
    if system == "rlhfless":
        sim = ServerlessSim(cfg, w)
        return [sim.step(i, e, p) for i, (e, p) in enumerate(steps)]
    fn = {"verl": verl_step, "rlhfuse": rlhfuse_step}[system]
    return [fn(cfg, w, i, e, p) for i, (e, p) in enumerate(steps)]


@dataclass(frozen=True)
class Comparison:
    """Warm-epoch means of each system, and RLHFless against verl."""

    summaries: dict[str, Summary]

    def speedup(self, system: str = "rlhfless") -> float:
        return self.summaries[system].speedup_over(self.summaries["verl"])

    def saving(self, system: str = "rlhfless") -> float:
        return self.summaries[system].saving_over(self.summaries["verl"])


def compare(cfg: SimConfig, w: Workload, systems=SYSTEMS) -> tuple[Comparison, dict]:
    """Run each system; summarise the steps after the first epoch (predictor warm)."""
    runs = {s: run_system(s, cfg, w) for s in systems}
    skip = sum(1 for r in runs["verl"] if r.epoch == 0) if w.epochs > 1 else 0
    return Comparison({s: summarise(r, skip) for s, r in runs.items()}), runs
