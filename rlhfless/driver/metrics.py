"""One step's metrics row from what the step observed (pure: no I/O, no clock).

Keys are verl-comparable where verl has one (`timing_s/gen`, `timing_s/ref`,
`timing_s/update_actor`, `timing_s/step`, `perf/throughput`) plus what serverless and
streaming add: GPU-seconds per stage (cold starts included), idle ratios, the scheduler's
decisions, and how much of the step overlapped: `timing_s/overlap` (seconds the learner
worked while any actor still ran) and `timing_share/after_rollout` (share of the step after
the last actor finished).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhfless.api.stages import PHASE_OF
from rlhfless.cost import StagePrices, cost_metrics
from rlhfless.driver.learn import LearnResult, response_stats
from rlhfless.driver.records import (
    BusyInterval,
    cost_by_stage,
    idle_ratios,
    lifetimes,
    overlap_seconds,
)
from rlhfless.driver.rollout import RolloutResult
from rlhfless.runtime.base import InstanceUsage

# verl's names for our stages' timings (verl times a reward model as `reward` too).
TIMING_KEYS = {"learner": "update_actor", "scorer": "reward"}


@dataclass(frozen=True)
class StepTrace:
    """What happened during a step, as the driver saw it."""

    t0: float
    t1: float
    busy: Sequence[BusyInterval]
    usages: Sequence[InstanceUsage]
    rollout: RolloutResult
    learn: LearnResult

    @property
    def gen_s(self) -> float:
        """Step start to the last actor's end."""
        return max(0.0, self.rollout.ended_at - self.t0)

    @property
    def after_rollout_s(self) -> float:
        """The last actor's end to the learner's finish: the part of the step's critical
        path left after the rollout (prewarm work the step waits for is not in it)."""
        return max(0.0, self.learn.finished_at - self.rollout.ended_at)


def _stats(reply: dict[str, Any]) -> dict[str, Any]:
    return reply.get("stats", {})


def work_seconds(trace: StepTrace) -> dict[str, float]:
    """Seconds each phase of the critical path took (what prewarm plans over): the rollout
    (its slowest actor's function time) and what is left after it."""
    return {"rollout": sum(trace.rollout.round_work_s), "learn": trace.after_rollout_s}


def cost_keys(trace: StepTrace, prices: StagePrices | None) -> dict[str, float]:
    """Where the step's GPU-seconds went, dollars, the rollout tail, serverful (rlhfless.cost)."""
    requests: dict[str, list[tuple[float, float]]] = {}
    for b in trace.busy:
        requests.setdefault(b.stage, []).append((b.start, b.end))
    samples = [(s.finished_at, len(s.response))
               for group in trace.rollout.samples.values() for s in group]
    return cost_metrics(lifetimes(trace.usages), requests, trace.t0, trace.t1, prices,
                        rollout_stages=[s for s, p in PHASE_OF.items() if p == "rollout"],
                        samples=samples)


def step_metrics(trace: StepTrace, *extra: dict[str, float],
                 prices: StagePrices | None = None) -> dict[str, float]:
    """The step's metrics row; `extra` (planning, scheduling stats) is merged in."""
    step_s = trace.t1 - trace.t0
    costs = cost_by_stage(trace.usages, trace.t0, trace.t1)
    gpu_s = {stage: c.gpu_seconds for stage, c in costs.items()}
    tokens = sum(s.response.size for group in trace.rollout.samples.values() for s in group)
    busy_s: dict[str, float] = defaultdict(float)
    for b in trace.busy:
        if b.stage != "actor":
            busy_s[TIMING_KEYS.get(b.stage, b.stage)] += b.end - b.start
    train = _stats(trace.learn.reply)
    saved = sum(float(st.get("prefill_tokens_saved", 0)) for st in trace.rollout.actor_stats)
    spans = {stage: [(b.start, b.end) for b in trace.busy if b.stage == stage]
             for stage in ("actor", "learner")}
    metrics: dict[str, float] = {
        "timing_s/gen": trace.gen_s,
        **{f"timing_s/{k}": v for k, v in busy_s.items()},
        "timing_s/ref": float(train.get("ref_s", 0.0)),
        "timing_s/step": step_s,
        "timing_s/overlap": overlap_seconds(spans["learner"], spans["actor"]),
        "timing_s/after_rollout": trace.after_rollout_s,
        "timing_share/after_rollout": trace.after_rollout_s / max(step_s, 1e-9),
        "timing_s/in_functions": sum(work_seconds(trace).values()),
        "perf/throughput": tokens / max(step_s, 1e-9),
        "perf/total_response_tokens": float(tokens),
        "perf/prefill_tokens_saved": saved,
        "cost/gpu_seconds": sum(gpu_s.values()),
        "cost/cold_start_gpu_seconds": sum(c.cold_gpu_seconds for c in costs.values()),
        **{f"cost/gpu_seconds/{k}": v for k, v in gpu_s.items()},
        **{f"cost/cold_start_gpu_seconds/{k}": c.cold_gpu_seconds for k, c in costs.items()},
        **{f"idle_ratio/{k}": v
           for k, v in idle_ratios(trace.usages, trace.busy, trace.t0, trace.t1).items()},
        **cost_keys(trace, prices),
    }
    if trace.rollout.first_group_at is not None:
        metrics["timing_s/first_group"] = trace.rollout.first_group_at - trace.t0
    metrics.update(trace.learn.stats)
    metrics.update(response_stats(trace.rollout.samples))
    metrics["sched/learner_recoveries"] = float(trace.learn.recoveries)
    metrics["sched/rerun_samples"] = float(trace.rollout.reruns)
    for more in extra:
        metrics.update(more)
    metrics.update({f"train/{k}": float(v) for k, v in train.items()})
    return metrics


def timeline(usages: Sequence[InstanceUsage], t0: float, t1: float) -> list[dict[str, object]]:
    """Instances alive during the step and the spans they served, times relative to its start
    (for timeline plots); `gpus` lists the devices an instance held where the runtime assigns
    them."""
    return [{"stage": u.stage, "instance": u.instance, "start": u.started_at - t0,
             "end": (u.ended_at or t1) - t0, "cold_start": u.cold_start_s,
             "busy": [[max(s, t0) - t0, min(e, t1) - t0] for s, e in u.busy
                      if e > t0 and s < t1],
             **({"gpus": list(u.devices)} if u.devices else {})}
            for u in usages if (u.ended_at or t1) > t0]


def requests_timeline(busy: Sequence[BusyInterval], t0: float,
                      t1: float) -> list[dict[str, object]]:
    """Stage requests in flight during the step, relative to its start (busy vs alive)."""
    return [{"stage": b.stage, "start": max(b.start, t0) - t0, "end": min(b.end, t1) - t0}
            for b in busy if min(b.end, t1) > max(b.start, t0)]
