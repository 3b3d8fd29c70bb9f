"""One step's metrics row from what the step observed (pure: no I/O, no clock).

Keys are verl-comparable where verl has one (`timing_s/gen`, `timing_s/ref`,
`timing_s/update_actor`, `timing_s/step`, `perf/throughput`) plus what serverless adds:
GPU-seconds per stage (cold starts included), idle ratios and the scheduler's decisions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlhfless.api.stages import PHASE_OF
from rlhfless.cost import StagePrices, cost_metrics
from rlhfless.driver.records import BusyInterval, cost_by_stage, idle_ratios, lifetimes
from rlhfless.driver.rollout import RolloutResult
from rlhfless.runtime.base import InstanceUsage

# verl's names for our stages' timings.
TIMING_KEYS = {"reference": "ref", "trainer": "update_actor"}


@dataclass(frozen=True)
class StepTrace:
    """What happened during a step, as the driver saw it."""

    t0: float
    t1: float
    gen_s: float
    busy: Sequence[BusyInterval]
    usages: Sequence[InstanceUsage]
    rollout: RolloutResult
    scores: Mapping[str, Mapping[str, Any]]
    train_reply: Mapping[str, Any]


def _stats(reply: Mapping[str, Any]) -> Mapping[str, Any]:
    return reply.get("stats", {})


def work_seconds(trace: StepTrace) -> dict[str, float]:
    """Seconds each phase spent inside functions (cold starts excluded): what prewarm plans."""
    return {
        "rollout": sum(trace.rollout.round_work_s),
        "score": max((float(_stats(r).get("function_s", 0.0)) for r in trace.scores.values()),
                     default=0.0),
        "train": float(_stats(trace.train_reply).get("function_s", 0.0)),
    }


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


def step_metrics(trace: StepTrace, *extra: Mapping[str, float],
                 prices: StagePrices | None = None) -> dict[str, float]:
    """The step's metrics row; `extra` (learning, planning, scheduling stats) is merged in."""
    step_s = trace.t1 - trace.t0
    costs = cost_by_stage(trace.usages, trace.t0, trace.t1)
    gpu_s = {stage: c.gpu_seconds for stage, c in costs.items()}
    tokens = sum(len(s.response) for group in trace.rollout.samples.values() for s in group)
    # Each scoring stage and the trainer run once a step: their busy spans are their timings.
    timings = {TIMING_KEYS.get(b.stage, b.stage): b.end - b.start
               for b in trace.busy if b.stage != "actor"}
    saved = sum(float(st.get("prefill_tokens_saved", 0)) for st in trace.rollout.actor_stats)
    saved += sum(float(_stats(r).get("prefill_tokens_saved", 0)) for r in trace.scores.values())
    metrics: dict[str, float] = {
        "timing_s/gen": trace.gen_s,
        **{f"timing_s/{k}": v for k, v in timings.items()},
        "timing_s/step": step_s,
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
    for more in extra:
        metrics.update(more)
    metrics.update({f"train/{k}": float(v) for k, v in _stats(trace.train_reply).items()})
    return metrics


def timeline(usages: Sequence[InstanceUsage], t0: float, t1: float) -> list[dict[str, object]]:
    """Instances alive during the step, times relative to its start (for timeline plots);
    `gpus` lists the devices an instance held where the runtime assigns them."""
    return [{"stage": u.stage, "instance": u.instance, "start": u.started_at - t0,
             "end": (u.ended_at or t1) - t0, "cold_start": u.cold_start_s,
             **({"gpus": list(u.devices)} if u.devices else {})}
            for u in usages if (u.ended_at or t1) > t0]


def requests_timeline(busy: Sequence[BusyInterval], t0: float,
                      t1: float) -> list[dict[str, object]]:
    """Stage requests in flight during the step, relative to its start (busy vs alive)."""
    return [{"stage": b.stage, "start": max(b.start, t0) - t0, "end": min(b.end, t1) - t0}
            for b in busy if min(b.end, t1) > max(b.start, t0)]
