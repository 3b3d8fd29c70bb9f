"""Per-step records: verl-comparable timing keys, GPU-second cost and idle ratios.

Cost is what a serverless platform bills: GPUs × seconds each instance was alive inside the
step's window (cold start and keep-alive included), split by stage.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rlhfless.driver.tracking import MetricSink, close_all, write_all
from rlhfless.runtime.base import InstanceUsage
from rlhfless.scheduling.cost import CostBreakdown, Lifetime, clip, cost_breakdown


@dataclass(frozen=True)
class BusyInterval:
    """One invocation as the driver saw it (`instance`: who served it, where known)."""

    stage: str
    start: float
    end: float
    instance: str | None = None


def union_spans(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint, sorted spans covering the same time as `spans`."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def overlap_seconds(a: Iterable[tuple[float, float]], b: Iterable[tuple[float, float]]) -> float:
    """Seconds during which something of `a` and something of `b` both ran."""
    total, ua, ub = 0.0, union_spans(a), union_spans(b)
    i = j = 0
    while i < len(ua) and j < len(ub):
        lo, hi = max(ua[i][0], ub[j][0]), min(ua[i][1], ub[j][1])
        total += max(0.0, hi - lo)
        if ua[i][1] < ub[j][1]:
            i += 1
        else:
            j += 1
    return total


def lifetimes(usages: Iterable[InstanceUsage]) -> dict[str, list[Lifetime]]:
    """Each stage's instances as billing lifetimes."""
    lives: dict[str, list[Lifetime]] = defaultdict(list)
    for u in usages:
        lives[u.stage].append(Lifetime(u.started_at, u.ended_at, u.gpus, u.cold_start_s))
    return lives


def cost_by_stage(
    usages: Iterable[InstanceUsage], t0: float, t1: float
) -> dict[str, CostBreakdown]:
    """GPU-seconds (and their cold-start share) of each stage's instances inside [t0, t1)."""
    return {stage: cost_breakdown(ls, t0, t1) for stage, ls in lifetimes(usages).items()}


def idle_ratios(
    usages: Iterable[InstanceUsage], busy: Iterable[BusyInterval], t0: float, t1: float
) -> dict[str, float]:
    """Fraction of each stage's instance-alive time in the window not spent serving.

    Busy time is what the driver saw per stage (requests may run on parallel instances, so
    it is summed, not merged).
    """
    alive = {s: c.alive_seconds for s, c in cost_by_stage(usages, t0, t1).items()}
    busy_s: dict[str, float] = defaultdict(float)
    for b in busy:
        window = clip((b.start, b.end), t0, t1)
        busy_s[b.stage] += 0.0 if window is None else window[1] - window[0]
    return {
        stage: min(1.0, max(0.0, 1.0 - busy_s[stage] / seconds))
        for stage, seconds in alive.items()
        if seconds > 0
    }


@dataclass
class StepRecord:
    step: int
    metrics: dict[str, float]
    reward_mean: float
    gpu_seconds_total: float
    weights_version: int
    checkpoint: str
    timeline: list[dict[str, object]] = field(default_factory=list)
    requests: list[dict[str, object]] = field(default_factory=list)  # stage requests in flight


class MetricsLog:
    """Append-only metrics.jsonl; a resumed run appends after the last recorded step. Each
    row also goes to `sinks` (TensorBoard, MLflow, W&B: see rlhfless.driver.tracking)."""

    def __init__(self, path: Path, sinks: list[MetricSink] | None = None):
        self.path = Path(path)
        self.sinks: list[MetricSink] = sinks or []

    def append(self, record: StepRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": record.step, "weights_version": record.weights_version,
               **record.metrics, "timeline": record.timeline, "requests": record.requests}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        write_all(self.sinks, record.step, row)

    def close(self) -> None:
        close_all(self.sinks)
        self.sinks = []

    def read(self, upto: int | None = None) -> list[dict[str, object]]:
        """Every row, or those of steps up to `upto` (the checkpointed ones)."""
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
        return rows if upto is None else [r for r in rows if int(r["step"]) <= upto]

    def truncate_after(self, step: int) -> None:
        """Drop rows past the checkpoint (a step that ran but was never checkpointed)."""
        rows = self.read(upto=step)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
