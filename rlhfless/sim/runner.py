"""Run a system for several RL steps on a workload and compare it with the baseline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlhfless.sim.bound import Bound, step_bound
from rlhfless.sim.config import SimConfig
from rlhfless.sim.results import StepResult, Summary, summarise
from rlhfless.sim.serverless import ServerlessSim
from rlhfless.sim.verl import rlhfuse_step, verl_step
from rlhfless.sim.workload import Workload, synthetic

SYSTEMS = ("verl", "rlhfuse", "rlhfless")
EPOCHS = 8  # steady state: the first WARMUP_EPOCHS are not reported
WARMUP_EPOCHS = 2  # epoch 0: no length predictions; epoch 1: nothing measured on a plan yet


def job_workload(cfg: SimConfig, family: str = "dapo", epochs: int = EPOCHS,
                 steps_per_epoch: int = 1, **family_overrides: float) -> Workload:
    """A dataset of `steps_per_epoch` batches, seen `epochs` times."""
    n = cfg.prompts_per_step * steps_per_epoch
    return synthetic(family, n, cfg.group_size, epochs, seed=cfg.seed, **family_overrides)


def run_system(system: str, cfg: SimConfig, w: Workload) -> list[StepResult]:
    steps = list(w.steps(cfg.prompts_per_step, seed=cfg.seed))
    if system == "rlhfless":
        sim = ServerlessSim(cfg, w)
        return [sim.step(i, e, p) for i, (e, p) in enumerate(steps)]
    fn = {"verl": verl_step, "rlhfuse": rlhfuse_step}[system]
    return [fn(cfg, w, i, e, p) for i, (e, p) in enumerate(steps)]


def warm(results: list[StepResult], w: Workload) -> list[StepResult]:
    """The steady-state steps: epochs from WARMUP_EPOCHS on (all if there are fewer)."""
    skip = min(WARMUP_EPOCHS, w.epochs - 1)
    return [r for r in results if r.epoch >= skip] or results


def warm_skip(cfg: SimConfig, w: Workload) -> int:
    """Number of steps before the steady state."""
    per_epoch = len(list(w.steps(cfg.prompts_per_step))) // max(1, w.epochs)
    return per_epoch * min(WARMUP_EPOCHS, w.epochs - 1)


def bound_parts(cfg: SimConfig, w: Workload, results: list[StepResult],
                peak_gpus: int) -> list[Bound]:
    """The step's lower bound (`sim.bound`: critical path and work) for each result's batch."""
    steps = list(w.steps(cfg.prompts_per_step, seed=cfg.seed))
    out = []
    for r in results:
        epoch, prompts = steps[r.step]
        out.append(step_bound(cfg, w.prompt_len[prompts], w.lengths[epoch, prompts],
                              peak_gpus))
    return out


def bounds(cfg: SimConfig, w: Workload, results: list[StepResult],
           peak_gpus: int) -> np.ndarray:
    """The step's lower bound for each result's batch (seconds)."""
    return np.array([b.step_s for b in bound_parts(cfg, w, results, peak_gpus)])


@dataclass(frozen=True)
class Comparison:
    """Steady-state means of each system, and RLHFless against verl."""

    summaries: dict[str, Summary]

    def speedup(self, system: str = "rlhfless") -> float:
        return self.summaries[system].speedup_over(self.summaries["verl"])

    def saving(self, system: str = "rlhfless") -> float:
        return self.summaries[system].saving_over(self.summaries["verl"])


def compare(cfg: SimConfig, w: Workload, systems=SYSTEMS) -> tuple[Comparison, dict]:
    """Run each system; summarise the steady-state steps."""
    runs = {s: run_system(s, cfg, w) for s in systems}
    skip = warm_skip(cfg, w)
    return Comparison({s: summarise(r, skip) for s, r in runs.items()}), runs
