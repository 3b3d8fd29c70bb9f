"""The rollout phase of RLHFless: actor instances, the cut, and the migrated long tail.

Three ways the rollout can run (`cut_mode`):

* no cut (cut-and-migrate off, τ = 1, or a single actor): every actor runs its bin to the end.
* "barrier" — what the driver does (`rlhfless.rollout.run_rollout`): each actor returns once
  a fraction τ of its own samples is done; when *all* have returned, the unfinished samples
  (prompt + partial response, re-prefilled) continue on the fewer actors `plan_migration`
  picks.  Samples cut early wait at the barrier.
* "global" — one cut for the whole rollout, the moment a fraction τ of *all* samples is done:
  every busy actor hands back its unfinished samples at once and they continue on fewer
  actors with no barrier wait (an alternative the simulator evaluates for the driver).
* "stream" — the hand-off cut of the streaming step: each actor is cut on its own, the moment
  a fraction τ of *its* samples is done; all its unfinished samples (prompt + partial
  response, re-prefilled) go at once to the still-running actor with the fewest samples in
  flight, which merges them into its batch and runs to the end (no cut of its own, so a
  sample moves at most once); the cut actor is released at once.  The last actor to reach
  its cut has nobody to hand to and keeps its own tail.  No sample waits for another actor.

An idle actor is billed until it has been idle `keep_alive` seconds (0 when the driver scales
it down as soon as it has nothing left), or until the driver scales the stage down (at the
cut for actors that are not targets, at the end of the rollout for everyone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rlhfless.sim.engine import Engine, Request
from rlhfless.sim.rollout import run_lockstep, run_until_cut

Planner = Callable[[list[Request], int], list[list[int]]]  # (unfinished, n_from) -> bins
# cold-start a new actor asked for at time t (None: not allowed, e.g. under a GPU quota)
Spawner = Callable[[float], "ActorLife | None"]


@dataclass(eq=False)
class ActorLife:
    engine: Engine
    start: float  # instance start (billing)
    ready: float  # serving from
    busy: list[tuple[float, float]] = field(default_factory=list)
    release: float = 0.0


@dataclass
class RolloutOutcome:
    actors: list[ActorLife]
    gen_end: float
    migrated: int = 0
    targets: int = 0
    cut_at: float | None = None


def _finish_billing(actors: Sequence[ActorLife], gen_end: float, keep_alive: float) -> None:
    for a in actors:
        if a.release == 0.0:  # not released earlier by a scale-down
            a.release = min(a.engine.last_finish + keep_alive, gen_end)
        a.release = max(a.release, a.ready)


def run_no_cut(actors: list[ActorLife], keep_alive: float) -> RolloutOutcome:
    for a in actors:
        run_until_cut(a.engine, None)
        a.busy.append((a.ready, a.engine.last_finish))
    gen_end = max(a.engine.last_finish for a in actors)
    _finish_billing(actors, gen_end, keep_alive)
    return RolloutOutcome(actors, gen_end)


def _migrate(batch: list[Request], target: ActorLife, now: float) -> None:
    for r in batch:
        r.migrations += 1
    target.engine.add(batch, now)


def run_barrier(actors: list[ActorLife], cut_after: Callable[[int], int], plan: Planner,
                spawn: Spawner, keep_alive: float) -> RolloutOutcome:
    returned = []
    for a in actors:
        returned.append(run_until_cut(a.engine, cut_after(a.engine.assigned)))
        a.busy.append((a.ready, returned[-1]))
    unfinished = [r for a in actors for r in a.engine.take_unfinished()]
    barrier = max(returned)
    if not unfinished:
        gen_end = max(a.engine.last_finish for a in actors)
        _finish_billing(actors, gen_end, keep_alive)
        return RolloutOutcome(actors, gen_end)
    bins = plan(unfinished, len(actors))
    # Targets: the actors still warm at the barrier, most recently returned first.
    warm = sorted((i for i, r in enumerate(returned) if r + keep_alive >= barrier),
                  key=lambda i: -returned[i])
    targets: list[ActorLife] = []
    for j, b in enumerate(bins):
        target = actors[warm[j]] if j < len(warm) else spawn(barrier)
        if target is None:  # no new actor allowed: the latest returned one takes it
            target = actors[warm[j % len(warm)]] if warm else actors[
                max(range(len(actors)), key=lambda i: returned[i])]
        elif j >= len(warm):  # too few actors still warm: a new one was cold-started
            actors.append(target)
        _migrate([unfinished[x] for x in b], target, max(barrier, target.ready))
        if target not in targets:
            targets.append(target)
    for a in actors:
        if a not in targets:  # scaled down at the barrier, or gone after keep-alive
            a.release = min(a.engine.last_finish + keep_alive, barrier)
    for t in targets:
        run_until_cut(t.engine, None)
        t.busy.append((barrier, t.engine.last_finish))
    gen_end = max(a.engine.last_finish for a in actors)
    _finish_billing(actors, gen_end, keep_alive)
    return RolloutOutcome(actors, gen_end, len(unfinished), len(targets), barrier)


def run_global(actors: list[ActorLife], cut_after: Callable[[int], int], plan: Planner,
               keep_alive: float) -> RolloutOutcome:
    engines = [a.engine for a in actors]
    by_engine = {a.engine.eid: a for a in actors}
    total = sum(e.assigned for e in engines)
    threshold = cut_after(total)
    state: dict[str, float] = {}

    def hook(e: Engine, finished: list[Request], now: float) -> list[Engine]:
        if "cut" in state or sum(x.stats.finished for x in engines) < threshold:
            return []
        busy = [x for x in engines if not x.idle]
        if len(busy) < 2:  # nothing to consolidate
            state["cut"] = now
            return []
        for x in busy:
            x.advance_to(now)
        busy.sort(key=lambda x: -x.unfinished())
        unfinished = [r for x in busy for r in x.take_unfinished()]
        bins = plan(unfinished, len(busy))
        targets = busy[:len(bins)]
        for b, x in zip(bins, targets, strict=True):
            _migrate([unfinished[i] for i in b], by_engine[x.eid], now)
        for x in engines:
            a = by_engine[x.eid]
            if x in targets:
                continue
            last = x.last_finish if x not in busy else now
            a.release = min(last + keep_alive, now) if x not in busy else now
            a.busy.append((a.ready, last))
        state.update(cut=now, moved=len(unfinished), targets=len(bins))
        return engines

    run_lockstep(engines, hook)
    cut = state.get("cut") if "moved" in state else None
    for a in actors:
        if cut is None or a.release == 0.0:  # never cut, or a target: busy to its end
            a.busy.append((a.ready, a.engine.last_finish))
    gen_end = max(e.last_finish for e in engines)
    _finish_billing(actors, gen_end, keep_alive)
    return RolloutOutcome(actors, gen_end, int(state.get("moved", 0)),
                          int(state.get("targets", 0)), cut)


def run_stream(actors: list[ActorLife], cut_after: Callable[[int], int],
               keep_alive: float) -> RolloutOutcome:
    """Per-actor hand-off cuts (module docstring): at its cut an actor hands every unfinished
    sample to the running actor with the fewest samples in flight and is released."""
    engines = [a.engine for a in actors]
    by_engine = {a.engine.eid: a for a in actors}
    threshold = {e.eid: cut_after(e.assigned) for e in engines}
    cut: set[int] = set()  # released after handing off
    tail: set[int] = set()  # received samples (or the last one left): run to the end
    state = {"moved": 0.0, "first": float("nan")}

    def hook(e: Engine, finished: list[Request], now: float) -> list[Engine]:
        if e.eid in cut or e.eid in tail or e.stats.finished < threshold[e.eid]:
            return []
        running = [x for x in engines
                   if x is not e and x.eid not in cut and not x.idle]
        a = by_engine[e.eid]
        if e.idle:  # done with everything at its cut: nothing to hand off
            cut.add(e.eid)
            a.release = now
            a.busy.append((a.ready, e.last_finish))
            return []
        if not running:  # the last one: keeps its own tail
            tail.add(e.eid)
            return []
        e.advance_to(now)
        unfinished = e.take_unfinished()
        for x in running:
            x.advance_to(now)
        target = min(running, key=lambda x: (x.unfinished(), x.eid))
        _migrate(unfinished, by_engine[target.eid], now)
        tail.add(target.eid)
        a.release = now
        a.busy.append((a.ready, now))
        cut.add(e.eid)
        state["moved"] += len(unfinished)
        if state["first"] != state["first"]:  # nan: the first hand-off
            state["first"] = now
        return [e, *running]

    run_lockstep(engines, hook)
    for a in actors:
        if a.engine.eid not in cut or a.release == 0.0:
            a.busy.append((a.ready, a.engine.last_finish))
    gen_end = max(e.last_finish for e in engines)
    _finish_billing(actors, gen_end, keep_alive)
    first = state["first"]
    return RolloutOutcome(actors, gen_end, int(state["moved"]), len(tail),
                          None if first != first else first)
