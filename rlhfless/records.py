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

from rlhfless.runtime.base import InstanceUsage


@dataclass(frozen=True)
class BusyInterval:
    """One invocation as the driver saw it."""

    stage: str
    start: float
    end: float


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def gpu_seconds_by_stage(
    usages: Iterable[InstanceUsage], t0: float, t1: float
) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for u in usages:
        end = u.ended_at if u.ended_at is not None else t1
        totals[u.stage] += u.gpus * _overlap(u.started_at, end, t0, t1)
    return dict(totals)


def alive_seconds_by_stage(
    usages: Iterable[InstanceUsage], t0: float, t1: float
) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for u in usages:
        end = u.ended_at if u.ended_at is not None else t1
        totals[u.stage] += _overlap(u.started_at, end, t0, t1)
    return dict(totals)


def idle_ratios(
    usages: Iterable[InstanceUsage], busy: Iterable[BusyInterval], t0: float, t1: float
) -> dict[str, float]:
    """Fraction of each stage's instance-alive time in the window not spent serving."""
    alive = alive_seconds_by_stage(usages, t0, t1)
    busy_s: dict[str, float] = defaultdict(float)
    for b in busy:
        busy_s[b.stage] += _overlap(b.start, b.end, t0, t1)
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


class MetricsLog:
    """Append-only metrics.jsonl; a resumed run appends after the last recorded step."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: StepRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": record.step, "weights_version": record.weights_version,
               **record.metrics, "timeline": record.timeline}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def read(self) -> list[dict[str, object]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
        return rows

    def truncate_after(self, step: int) -> None:
        """Drop rows past the checkpoint (a step that ran but was never checkpointed)."""
        rows = [r for r in self.read() if int(r["step"]) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
