"""What one simulated step produced, and how steps are summarised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# The streaming step's phases on the critical path: waiting for the first actor (cold start
# or weights), generation until the last group is in, the learner's queue after it, the
# optimizer step and publish.
STEP_PHASES = ("sync", "gen", "learn_tail", "finish")


@dataclass
class StepResult:
    system: str
    step: int
    epoch: int
    step_s: float  # wall time of the step
    gpu_s: float  # billed GPU-seconds
    phases: dict[str, float]  # seconds on the critical path per phase (sum = step_s)
    tokens: int  # response tokens generated
    prefill_tokens: int = 0
    prefill_saved: int = 0
    preemptions: int = 0
    actors: int = 0  # rollout instances used
    migrated: int = 0  # samples moved by cut-and-migrate (or RLHFuse's migration)
    peak_gpus: int = 0
    gen_busy_gpu_s: float = 0.0  # GPU-seconds actually decoding/prefilling
    t0: float = 0.0  # when the step started on the system's clock
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    system: str
    steps: int
    step_s: float  # mean step time
    gpu_s: float  # mean billed GPU-seconds per step
    gen_s: float
    tokens: float
    actors: float
    peak_gpus: float

    def speedup_over(self, base: Summary) -> float:
        return base.step_s / self.step_s

    def saving_over(self, base: Summary) -> float:
        return 1.0 - self.gpu_s / base.gpu_s


def summarise(results: Sequence[StepResult], skip: int = 0) -> Summary:
    """Mean over steps, dropping the first `skip` (e.g. the epoch before predictions exist)."""
    rs = list(results)[skip:] or list(results)
    return Summary(
        system=rs[0].system,
        steps=len(rs),
        step_s=float(np.mean([r.step_s for r in rs])),
        gpu_s=float(np.mean([r.gpu_s for r in rs])),
        gen_s=float(np.mean([r.phases.get("gen", 0.0) for r in rs])),
        tokens=float(np.mean([r.tokens for r in rs])),
        actors=float(np.mean([r.actors for r in rs])),
        peak_gpus=float(np.max([r.peak_gpus for r in rs])),
    )
