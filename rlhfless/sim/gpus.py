"""GPUs held over time by billed instances: peaks, and when a quota leaves room to start."""

from __future__ import annotations

import math
from collections.abc import Iterable

from rlhfless.scheduling.cost import Lifetime
from rlhfless.scheduling.learner import earliest_free


def held_curve(lives: Iterable[Lifetime], since: float) -> list[tuple[float, float]]:
    """(time, GPUs held from then on) change points from `since` on."""
    events: list[tuple[float, float]] = []
    level = 0.0
    for x in lives:
        end = math.inf if x.end is None else x.end
        if end <= since:
            continue
        if x.start <= since:
            level += x.gpus
        else:
            events.append((x.start, x.gpus))
        if math.isfinite(end):
            events.append((end, -x.gpus))
    curve = [(since, level)]
    for t, d in sorted(events):
        level += d
        if curve and curve[-1][0] == t:
            curve[-1] = (t, level)
        else:
            curve.append((t, level))
    return curve


def peak_gpus(lives: Iterable[Lifetime], t0: float = -math.inf, t1: float = math.inf) -> int:
    """Most GPUs held at once inside [t0, t1)."""
    lives = list(lives)
    if not lives:
        return 0
    since = max(t0, min(x.start for x in lives))
    return int(round(max(level for t, level in held_curve(lives, since) if t < t1)))


def earliest_start(lives: Iterable[Lifetime], quota: int | None, gpus: float,
                   not_before: float) -> float:
    """First time ≥ `not_before` from which `gpus` more GPUs stay within `quota` (held GPUs
    only fall after the last known start); `not_before` with no quota."""
    if quota is None:
        return not_before
    curve = [(t, int(math.floor(quota - level + 1e-9)))
             for t, level in held_curve(lives, not_before)]
    return max(not_before, earliest_free(curve, int(math.ceil(gpus - 1e-9))))
