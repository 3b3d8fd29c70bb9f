"""A step's cost keys for its metrics row: the split, dollars, the rollout tail, serverful.

Keys (GPU-seconds unless named otherwise; `<use>` is one of split.USES):
  cost/split/<use>, cost/split/<use>/<stage>     where the GPU-seconds went
  cost/dollars, cost/dollars/<stage>             GPU-seconds × $/GPU-hour / 3600
  cost/tail/{seconds,share,gpu_seconds,gpu_share,estimated}   the rollout's tail
  cost/serverful/{gpu_seconds,busy,idle,dollars}, cost/serverful/{gpu_seconds,dollars}/<stage>
  cost/saving/{gpu_seconds,dollars,ratio}        serverful minus what was billed

`cost/dollars/<stage>` is absent for a stage whose GPU type has no price, and `cost/dollars`
(and the serverful and saving dollars) unless every stage that used GPUs has one: a partial
total would read as the whole bill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rlhfless.cost.prices import StagePrices
from rlhfless.cost.split import USES, serverful_stage, split_stage, stage_gpus
from rlhfless.cost.tail import estimated_finish_times, rollout_tail
from rlhfless.scheduling.cost import Interval, Lifetime

SECONDS_PER_HOUR = 3600.0
# Keys read elsewhere (operator metrics, report, budget ledger).
KEY_GPU_SECONDS = "cost/gpu_seconds"  # written by the driver (cost_by_stage), per stage too
KEY_DOLLARS = "cost/dollars"
KEY_SPLIT = "cost/split"
KEY_SERVERFUL_GPU_SECONDS = "cost/serverful/gpu_seconds"
KEY_SERVERFUL_DOLLARS = "cost/serverful/dollars"
KEY_TAIL_SHARE = "cost/tail/share"


def dollars(gpu_seconds: Mapping[str, float], prices: StagePrices | None) -> dict[str, float]:
    """Per stage and in total (`""`), only for priced stages; no total if one is missing."""
    if prices is None:
        return {}
    out: dict[str, float] = {}
    complete = True
    for stage, seconds in gpu_seconds.items():
        price = prices.of(stage)
        if price is None:
            complete = complete and seconds <= 0
            continue
        out[stage] = seconds * price / SECONDS_PER_HOUR
    if complete:
        out[""] = sum(out.values())
    return out


def _keyed(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    return {(f"{prefix}/{k}" if k else prefix): v for k, v in values.items()}


def cost_metrics(
    lives: Mapping[str, Sequence[Lifetime]],
    requests: Mapping[str, Sequence[Interval]],
    t0: float,
    t1: float,
    prices: StagePrices | None = None,
    rollout_stages: Sequence[str] = (),
    samples: Sequence[tuple[float | None, int]] = (),
) -> dict[str, float]:
    """The step's cost keys from instance lifetimes and requests per stage over [t0, t1).

    `samples`: (when it finished, Unix seconds, or None if its actor did not say; response
    tokens) per rollout sample; a missing time is estimated from the sample's length.
    """
    row: dict[str, float] = {}
    splits = {s: split_stage(lives.get(s, ()), requests.get(s, ()), t0, t1)
              for s in sorted(set(lives) | set(requests))}
    for use in USES:
        row[f"{KEY_SPLIT}/{use}"] = sum(getattr(sp, use) for sp in splits.values())
        row.update({f"{KEY_SPLIT}/{use}/{s}": getattr(sp, use) for s, sp in splits.items()})
    billed = {s: sp.total for s, sp in splits.items()}
    row.update(_keyed(KEY_DOLLARS, dollars(billed, prices)))

    gpus = stage_gpus(lives)
    serverful = {s: serverful_stage(requests.get(s, ()), gpus.get(s, 0.0), t0, t1)
                 for s in splits}
    held = {s: sf.gpu_seconds for s, sf in serverful.items()}
    row.update({
        KEY_SERVERFUL_GPU_SECONDS: sum(held.values()),
        **{f"{KEY_SERVERFUL_GPU_SECONDS}/{s}": v for s, v in held.items()},
        "cost/serverful/busy": sum(sf.busy for sf in serverful.values()),
        "cost/serverful/idle": sum(sf.idle for sf in serverful.values()),
        "cost/saving/gpu_seconds": sum(held.values()) - sum(billed.values()),
    })
    if sum(held.values()) > 0:
        row["cost/saving/ratio"] = 1.0 - sum(billed.values()) / sum(held.values())
    serverful_dollars = dollars(held, prices)
    row.update(_keyed(KEY_SERVERFUL_DOLLARS, serverful_dollars))
    if "" in serverful_dollars and KEY_DOLLARS in row:
        row["cost/saving/dollars"] = serverful_dollars[""] - row[KEY_DOLLARS]

    rollout_lives = [life for s in rollout_stages for life in lives.get(s, ())]
    rollout_reqs = [iv for s in rollout_stages for iv in requests.get(s, ())]
    if samples and rollout_reqs:
        r0, r1 = min(a for a, _ in rollout_reqs), max(b for _, b in rollout_reqs)
        guesses = estimated_finish_times([n for _, n in samples], r0, r1)
        finish = [g if at is None else at for (at, _), g in zip(samples, guesses, strict=True)]
        tail = rollout_tail(finish, r0, r1, rollout_lives)
        if tail is not None:
            row.update({
                "cost/tail/seconds": tail.seconds,
                KEY_TAIL_SHARE: tail.share,
                "cost/tail/gpu_seconds": tail.gpu_seconds,
                "cost/tail/gpu_share": tail.gpu_share,
                # Fraction of finish times estimated from lengths rather than reported.
                "cost/tail/estimated": sum(at is None for at, _ in samples) / len(samples),
            })
    return row
