"""Requests from a workload, and running engines to completion, to a cut, or in lock-step."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from rlhfless.sim.engine import Engine, Request
from rlhfless.sim.workload import Workload


def make_groups(
    w: Workload, epoch: int, prompts: Sequence[int], predicted: np.ndarray | None = None
) -> list[list[Request]]:
    """One list of G requests per prompt, in batch order; rid = position in the batch."""
    groups: list[list[Request]] = []
    g = w.group_size
    for k, p in enumerate(prompts):
        pred = float(predicted[k]) if predicted is not None else 0.0
        groups.append([
            Request(k * g + i, int(p), int(w.prompt_len[p]), int(w.lengths[epoch, p, i]),
                    predicted=pred)
            for i in range(g)
        ])
    return groups


def run_until_cut(engine: Engine, stop_after: int | None) -> float:
    """Run one actor until `stop_after` of its current requests finished (all if None).

    Returns the time its invocation returns: the moment of the last counted finish.
    """
    target = engine.unfinished() if stop_after is None else min(stop_after, engine.unfinished())
    done = 0
    while done < target and not engine.idle:
        done += len(engine.step())
    return engine.t


def cut_count(n: int, tau: float | None) -> int | None:
    """The actor's cut rule: return once ceil(τ·n) of its n samples are done."""
    return None if tau is None else math.ceil(tau * n)


Hook = Callable[[Engine, list[Request], float], Iterable[Engine]]


def run_lockstep(engines: Sequence[Engine], hook: Hook | None = None) -> None:
    """Advance all engines in global time order until all are idle.

    After every event `hook(engine, finished, now)` may move requests between engines (it
    must `advance_to(now)` any engine it touches) and returns the engines it changed.
    """
    heap = [(e.next_event_time(), e.eid, e.version) for e in engines]
    heapq.heapify(heap)
    by_id = {e.eid: e for e in engines}
    while heap:
        t, eid, version = heapq.heappop(heap)
        e = by_id[eid]
        if version != e.version or math.isinf(t):
            continue
        finished = e.step()
        touched = {e.eid: e}
        if hook is not None:
            touched.update((x.eid, x) for x in hook(e, finished, e.t))
        for x in touched.values():
            heapq.heappush(heap, (x.next_event_time(), x.eid, x.version))
