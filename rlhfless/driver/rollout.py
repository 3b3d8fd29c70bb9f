"""Rollout orchestration: N actor invocations in parallel, then the cut long tail migrated.

Each actor bin holds whole GRPO groups (the prompt's prefill is shared by its samples). With
cut-and-migrate on, every actor returns once a fraction τ of its samples is done; the
unfinished samples (prompt + partial response) continue on fewer actors with the same weights
version and the same per-sample random streams, so the result equals uncut generation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rlhfless.api.wire import ActorRequest, RolloutPrompt, RolloutSample
from rlhfless.driver.records import BusyInterval
from rlhfless.runtime.base import Runtime


@dataclass(frozen=True)
class PromptItem:
    key: str
    text: str
    prompt_ids: list[int]
    meta: dict[str, object]


@dataclass
class RolloutResult:
    samples: dict[str, list[RolloutSample]]
    actor_stats: list[dict[str, float]] = field(default_factory=list)
    migrated: int = 0
    migration_actors: int = 0
    round_work_s: list[float] = field(default_factory=list)  # slowest function time per round


class LostSamplesError(RuntimeError):
    pass


@dataclass
class RolloutSettings:
    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    cut_fraction: float | None


async def invoke_timed(
    runtime: Runtime, stage: str, payload: dict, busy: list[BusyInterval]
) -> dict:
    """`runtime.invoke`, recording the call as a busy interval of `stage`."""
    start = time.time()
    try:
        return await runtime.invoke(stage, payload)
    finally:
        busy.append(BusyInterval(stage, start, time.time()))


def _request(
    request_id: str, version: int, prompts: list[RolloutPrompt], s: RolloutSettings,
    cut: float | None,
) -> dict:
    return ActorRequest(
        request_id=request_id, weights_version=version, prompts=prompts,
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
        seed=s.seed, cut_fraction=cut,
    ).model_dump(mode="json")


async def run_rollout(
    runtime: Runtime,
    items: Sequence[PromptItem],
    bins: Sequence[Sequence[int]],
    version: int,
    settings: RolloutSettings,
    request_prefix: str,
    busy: list[BusyInterval],
    migration_bins: Callable[[list[RolloutSample], list[int]], list[list[int]]],
) -> RolloutResult:
    """`migration_bins(unfinished, remaining_budget)` groups unfinished samples onto actors."""
    by_key = {item.key: item for item in items}
    g = settings.group_size
    cut = settings.cut_fraction if len([b for b in bins if b]) > 1 else None
    payloads = []
    for i, bin_ in enumerate(b for b in bins if b):
        prompts = [
            RolloutPrompt(key=items[j].key, prompt_ids=items[j].prompt_ids,
                          sample_indices=list(range(g)))
            for j in bin_
        ]
        payloads.append(_request(f"{request_prefix}-r0-{i}", version, prompts, settings, cut))
    replies = await asyncio.gather(*(invoke_timed(runtime, "actor", p, busy) for p in payloads))
    result = RolloutResult(samples={item.key: [] for item in items})
    result.round_work_s.append(max(r["stats"].get("function_s", 0.0) for r in replies))
    unfinished: list[RolloutSample] = []
    for reply in replies:
        result.actor_stats.append(reply["stats"])
        for raw in reply["samples"]:
            sample = RolloutSample.model_validate(raw)
            (result.samples[sample.key] if sample.finished else unfinished).append(sample)

    if unfinished:
        remaining = [settings.max_new_tokens - len(s.response) for s in unfinished]
        groups = [b for b in migration_bins(unfinished, remaining) if b]
        result.migrated = len(unfinished)
        result.migration_actors = len(groups)
        await runtime.scale("actor", len(groups))
        payloads = []
        for i, group in enumerate(groups):
            per_key: dict[str, list[RolloutSample]] = {}
            for idx in group:
                per_key.setdefault(unfinished[idx].key, []).append(unfinished[idx])
            prompts = [
                RolloutPrompt(key=key, prompt_ids=by_key[key].prompt_ids,
                              sample_indices=[s.index for s in samples],
                              prefixes=[s.response for s in samples])
                for key, samples in per_key.items()
            ]
            payloads.append(
                _request(f"{request_prefix}-r1-{i}", version, prompts, settings, None)
            )
        replies = await asyncio.gather(
            *(invoke_timed(runtime, "actor", p, busy) for p in payloads)
        )
        result.round_work_s.append(max(r["stats"].get("function_s", 0.0) for r in replies))
        for reply in replies:
            result.actor_stats.append(reply["stats"])
            for raw in reply["samples"]:
                sample = RolloutSample.model_validate(raw)
                result.samples[sample.key].append(sample)

    for key, samples in result.samples.items():
        samples.sort(key=lambda s: s.index)
        if [s.index for s in samples] != list(range(g)):
            raise LostSamplesError(f"prompt {key}: got samples {[s.index for s in samples]}")
    return result
