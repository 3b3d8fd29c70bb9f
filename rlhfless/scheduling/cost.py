"""GPU-second accounting: what a serverless platform bills, planned and measured.

Cost = Σ over function instances of GPUs × seconds alive, cold start and keep-alive included
(stricter than counting busy time only).

* `planned_gpu_seconds(bin_times, profile, warm)` — the cost model the scaling policy uses:
  every actor with work pays ``gpus × (cold start (unless warm) + busy + keep_alive)``.
* `Lifetime` + `cost_breakdown(lives, t0, t1)` — measured accounting over a window: each
  instance's alive time split into cold start, busy (union of its request intervals) and
  idle; ``idle_ratio = 1 - busy / alive`` (cold start counts as not serving).
* `union_length`, `clip` — interval helpers (seconds, half-open [start, end)).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rlhfless.scheduling.profile import Profile

Interval = tuple[float, float]


def planned_gpu_seconds(bin_times: Sequence[float], profile: Profile, warm: int = 0) -> float:
    """GPU-seconds of running one actor per non-empty bin; `warm` actors skip the cold start.

    Empty bins launch nothing. Warm actors take the longest bins first (it does not matter
    for the sum, only for which actors are billed a cold start).
    """
    busy = sorted((t for t in bin_times if t > 0), reverse=True)
    n_cold = max(0, len(busy) - max(0, warm))
    per_actor = sum(busy) + len(busy) * profile.keep_alive_s + n_cold * profile.cold_start_s
    return profile.gpus_per_actor * per_actor


def clip(iv: Interval, t0: float, t1: float) -> Interval | None:
    start, end = max(iv[0], t0), min(iv[1], t1)
    return (start, end) if end > start else None


def union_length(intervals: Iterable[Interval]) -> float:
    """Seconds covered by at least one interval."""
    merged: list[list[float]] = []
    for start, end in sorted(iv for iv in intervals if iv[1] > iv[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return sum(end - start for start, end in merged)


@dataclass(frozen=True)
class Lifetime:
    """One instance: alive from `start` to `end` (None = still alive), serving `busy`."""

    start: float
    end: float | None
    gpus: float = 1.0
    cold_start_s: float = 0.0
    busy: tuple[Interval, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class CostBreakdown:
    gpu_seconds: float
    cold_gpu_seconds: float
    busy_gpu_seconds: float
    idle_gpu_seconds: float
    alive_seconds: float

    @property
    def idle_ratio(self) -> float:
        """Fraction of GPU-seconds not serving requests (cold start included); 0 if none."""
        if self.gpu_seconds <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.busy_gpu_seconds / self.gpu_seconds))


def cost_breakdown(lives: Iterable[Lifetime], t0: float, t1: float) -> CostBreakdown:
    """Split the GPU-seconds inside [t0, t1) into cold start, busy and idle."""
    gpu_s = cold_s = busy_s = alive_s = 0.0
    for life in lives:
        window = clip((life.start, t1 if life.end is None else life.end), t0, t1)
        if window is None:
            continue
        w0, w1 = window
        alive = w1 - w0
        cold_iv = clip((life.start, life.start + life.cold_start_s), w0, w1)
        cold = 0.0 if cold_iv is None else cold_iv[1] - cold_iv[0]
        # Busy time never overlaps the cold start: an instance serves once it is ready.
        ready = max(w0, life.start + life.cold_start_s)
        busy = union_length(c for iv in life.busy if (c := clip(iv, ready, w1)) is not None)
        gpu_s += life.gpus * alive
        cold_s += life.gpus * cold
        busy_s += life.gpus * busy
        alive_s += alive
    return CostBreakdown(gpu_seconds=gpu_s, cold_gpu_seconds=cold_s, busy_gpu_seconds=busy_s,
                         idle_gpu_seconds=max(0.0, gpu_s - cold_s - busy_s),
                         alive_seconds=alive_s)
