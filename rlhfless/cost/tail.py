"""The rollout's long tail: the time when fewer than half of the samples are still running.

Responses vary in length, so most samples finish early and a few long ones keep the rollout
(and whatever GPUs are alive meanwhile) going. With finish times f_1 ≤ … ≤ f_S, fewer than
half (S/2) run once more than half have finished, i.e. from f_(⌊S/2⌋+1) to the end of the
rollout. The tail's GPU-seconds are those of the rollout stage's instances alive in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rlhfless.scheduling.cost import Lifetime, cost_breakdown


@dataclass(frozen=True)
class Tail:
    start: float  # when fewer than half of the samples were left
    seconds: float  # from then to the end of the rollout
    share: float  # of the rollout's wall time (0-1)
    gpu_seconds: float  # rollout instances' GPU-seconds inside the tail
    gpu_share: float  # of their GPU-seconds over the whole rollout (0-1)


def tail_start(finish_times: Sequence[float]) -> float:
    """The moment fewer than half of the samples are still running."""
    if not finish_times:
        raise ValueError("no samples")
    ordered = sorted(finish_times)
    return ordered[len(ordered) // 2]


def rollout_tail(finish_times: Sequence[float], r0: float, r1: float,
                 lives: Iterable[Lifetime]) -> Tail | None:
    """The tail of a rollout that ran over [r0, r1); None without samples or duration.

    Finish times are clamped into the rollout (clocks of other machines may differ a little).
    """
    if not finish_times or r1 <= r0:
        return None
    start = min(r1, max(r0, tail_start(finish_times)))
    lives = list(lives)
    whole = cost_breakdown(lives, r0, r1).gpu_seconds
    in_tail = cost_breakdown(lives, start, r1).gpu_seconds if r1 > start else 0.0
    return Tail(start=start, seconds=r1 - start, share=(r1 - start) / (r1 - r0),
                gpu_seconds=in_tail, gpu_share=in_tail / whole if whole > 0 else 0.0)


def estimated_finish_times(lengths: Sequence[int], r0: float, r1: float) -> list[float]:
    """Finish times of samples whose actor did not report them: a batch decodes one token
    per sample per step, so a sample of L tokens ends about L/L_max of the way through."""
    longest = max(lengths, default=0)
    if longest <= 0:
        return [r1 for _ in lengths]
    return [r0 + (r1 - r0) * length / longest for length in lengths]
