"""From finished groups to the learner: reward, shard, add; then one `finish` per step.

Streaming: `submit(key, samples)` (called by the rollout the moment a group is whole) starts
its reward request; once scored, the group is written as a shard of the job's store and
added to the learner, one add at a time in the order groups were scored. `finish` waits for
the last add and asks for the step's optimizer step. The learner's `begin` goes out when the
step starts, so its model load (if any) overlaps generation.

Barrier (`scheduling.streaming: false`, the comparison baseline): nothing is scored before
the whole rollout is in; then one reward request, the adds, and `finish`.

A learner that restarted mid-step answers 409 `step_not_open`: `LearnerClient` begins the
step again and re-sends every group it had added, in the same order, from their shards,
then carries on; the update equals the uninterrupted one. `finish` names the version the
learner publishes (`new_version`, chosen by the driver above every version used so far: the
store is append-only).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhfless.api.spec import JobSpec
from rlhfless.api.wire import (
    STEP_NOT_OPEN,
    GroupData,
    LearnerAdd,
    LearnerBegin,
    LearnerFinish,
    RewardItem,
    RewardRequest,
    RolloutSample,
)
from rlhfless.driver.records import BusyInterval
from rlhfless.driver.rollout import PromptItem, invoke_timed
from rlhfless.model.tokenizer import Tokenizer
from rlhfless.runtime.base import InvocationError, Runtime
from rlhfless.store.shards import ShardStore

# A group whose arrays exceed this travels as a shard reference instead of inline.
INLINE_LIMIT_BYTES = 1 << 20
MAX_RECOVERIES = 3


def group_nbytes(group: GroupData) -> int:
    arrays = [group.prompt_ids, *group.responses, *(group.logprobs or [])]
    return sum(a.nbytes for a in arrays)


class LearnerClient:
    """begin / add / finish of one step against the learner stage, with restart recovery."""

    def __init__(self, runtime: Runtime, shards: ShardStore, step: int, version: int,
                 group_ids: Sequence[str], prefix: str, busy: list[BusyInterval],
                 inline_limit: int = INLINE_LIMIT_BYTES, new_version: int | None = None):
        self.runtime, self.shards = runtime, shards
        self.step, self.version = step, version
        self.new_version = new_version  # what finish publishes (None: version + 1)
        self.group_ids = list(group_ids)
        self.prefix, self.busy = prefix, busy
        self.inline_limit = inline_limit
        self.added: list[tuple[str, str]] = []  # (group id, shard id), in add order
        self.generation = 0  # how many times the step was begun
        self.recoveries = 0
        self._lost = False  # the learner lost the step: begin again before the next call
        self.stats: dict[str, float] = {}

    async def _call(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await invoke_timed(self.runtime, "learner", payload, self.busy)

    async def begin(self) -> None:
        self.generation += 1
        reply = await self._call(LearnerBegin(
            request_id=f"{self.prefix}-begin{self.generation}", weights_version=self.version,
            step=self.step, group_ids=self.group_ids).model_dump())
        self.stats.update(reply.get("stats", {}))

    def _add_payload(self, group_id: str, shard: str, group: GroupData | None) -> dict:
        request_id = f"{self.prefix}-add{self.generation}-{shard.rsplit('/', 1)[-1]}"
        if group is not None and group_nbytes(group) <= self.inline_limit:
            return LearnerAdd(request_id=request_id, weights_version=self.version,
                              step=self.step, group=group).model_dump()
        return LearnerAdd(request_id=request_id, weights_version=self.version, step=self.step,
                          shard=shard).model_dump()

    async def add(self, group: GroupData, shard: str) -> None:
        await self._with_recovery(lambda: self._call(self._add_payload(group.group_id, shard,
                                                                       group)))
        self.added.append((group.group_id, shard))

    async def finish(self) -> dict[str, Any]:
        return await self._with_recovery(lambda: self._call(LearnerFinish(
            request_id=f"{self.prefix}-finish{self.generation}", weights_version=self.version,
            step=self.step, new_version=self.new_version).model_dump()))

    async def _with_recovery(self, call) -> dict[str, Any]:
        while True:
            try:
                if self._lost:
                    await self._recover()
                return await call()
            except InvocationError as exc:
                if exc.code != STEP_NOT_OPEN or self.recoveries >= MAX_RECOVERIES:
                    raise
                self._lost = True
                self.recoveries += 1

    async def _recover(self) -> None:
        """Open the step again and re-send its groups, in the same order, from the shards."""
        await self.begin()
        for group_id, shard in self.added:
            group = await asyncio.to_thread(self._load_group, shard)
            await self._call(self._add_payload(group_id, shard, group))
        self._lost = False

    def _load_group(self, shard: str) -> GroupData:
        return GroupData.model_validate(self.shards.get(shard))


@dataclass
class LearnResult:
    reply: dict[str, Any]
    rewards: dict[str, list[float]]
    finished_at: float  # when the learner's finish replied (epoch s)
    stats: dict[str, float] = field(default_factory=dict)
    recoveries: int = 0


class StepLearning:
    """The learn side of one step: rewards, shards and the learner."""

    def __init__(self, runtime: Runtime, spec: JobSpec, shards: ShardStore,
                 tokenizer: Tokenizer, items: Sequence[PromptItem], step: int, version: int,
                 prefix: str, busy: list[BusyInterval],
                 inline_limit: int = INLINE_LIMIT_BYTES, new_version: int | None = None):
        self.runtime, self.spec, self.shards, self.tok = runtime, spec, shards, tokenizer
        self.items = {item.key: item for item in items}
        self.position = {item.key: k for k, item in enumerate(items)}
        self.step, self.prefix, self.busy = step, prefix, busy
        self.streaming = spec.scheduling.streaming
        self.client = LearnerClient(runtime, shards, step, version, [i.key for i in items],
                                    prefix, busy, inline_limit, new_version)
        self.rewards: dict[str, list[float]] = {}
        self._scoring: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[tuple[GroupData, str] | None] = asyncio.Queue()
        self._feeder: asyncio.Task[None] | None = None
        self._begun: asyncio.Task[None] | None = None
        self._held: list[tuple[str, list[RolloutSample]]] = []

    # -- streaming -----------------------------------------------------------------------
    def start(self) -> None:
        """Begin the step on the learner now (streaming) or after the rollout (barrier)."""
        if self.streaming:
            self._begun = asyncio.create_task(self.client.begin())
            self._feeder = asyncio.create_task(self._feed())

    def submit(self, key: str, samples: list[RolloutSample]) -> None:
        """A whole group is in (called by the rollout; never blocks)."""
        if self.streaming:
            self._scoring.append(asyncio.create_task(self._score_and_queue(key, samples)))
        else:
            self._held.append((key, samples))

    async def _score_and_queue(self, key: str, samples: list[RolloutSample]) -> None:
        rewards = await self._reward([(key, samples)], str(self.position[key]))
        group = self._group(key, samples, rewards[key])
        shard = await asyncio.to_thread(self._write_shard, group)
        await self._queue.put((group, shard))

    async def _feed(self) -> None:
        assert self._begun is not None
        await self._begun
        while (item := await self._queue.get()) is not None:
            await self.client.add(*item)

    async def finish(self) -> LearnResult:
        """After the rollout: the remaining adds, then the step's optimizer step."""
        if self.streaming:
            assert self._feeder is not None
            try:
                await asyncio.gather(*self._scoring)
            finally:
                await self._queue.put(None)
            await self._feeder
        else:
            begun = asyncio.create_task(self.client.begin())
            rewards = await self._reward(self._held, "all")
            await begun
            for key, samples in sorted(self._held, key=lambda ks: self.position[ks[0]]):
                group = self._group(key, samples, rewards[key])
                await self.client.add(group, await asyncio.to_thread(self._write_shard, group))
        reply = await self.client.finish()
        return LearnResult(reply=reply, rewards=self.rewards, finished_at=time.time(),
                           stats=self._stats(), recoveries=self.client.recoveries)

    async def abort(self) -> None:
        """The rollout failed: stop the learn side's tasks."""
        tasks = [*self._scoring, *(t for t in (self._feeder, self._begun) if t is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- pieces --------------------------------------------------------------------------
    async def _reward(self, groups: list[tuple[str, list[RolloutSample]]],
                      tag: str) -> dict[str, list[float]]:
        items = await asyncio.to_thread(self._reward_items, groups)
        request_id = f"{self.prefix}-reward-{tag}"
        reply = await invoke_timed(self.runtime, self.spec.stages.reward_stage, RewardRequest(
            request_id=request_id, items=items).model_dump(), self.busy)
        flat, out, k = reply["rewards"], {}, 0
        for key, samples in groups:
            out[key] = [float(r) for r in flat[k:k + len(samples)]]
            k += len(samples)
        self.rewards.update(out)
        return out

    def _reward_items(self, groups: list[tuple[str, list[RolloutSample]]]) -> list[RewardItem]:
        return [RewardItem(prompt=self.items[key].text, response=self.tok.decode(
                    s.response.tolist()), meta=self.items[key].meta)
                for key, samples in groups for s in samples]

    def _group(self, key: str, samples: list[RolloutSample], rewards: list[float]) -> GroupData:
        return GroupData(group_id=key, prompt_ids=self.items[key].prompt_ids,
                         responses=[s.response for s in samples], rewards=rewards,
                         logprobs=[s.logprobs for s in samples])

    def _write_shard(self, group: GroupData) -> str:
        return self.shards.put(self.step, f"g{self.position[group.group_id]:05d}",
                               group.model_dump())

    def _stats(self) -> dict[str, float]:
        r = np.array([x for key in self.items for x in self.rewards[key]], dtype=np.float64)
        return {
            "reward/mean": float(r.mean()),
            "reward/std": float(r.std(ddof=1)) if r.size > 1 else 0.0,
            "reward/max": float(r.max()),
        }


def response_stats(samples: dict[str, list[RolloutSample]]) -> dict[str, float]:
    lengths = np.array([s.response.size for group in samples.values() for s in group],
                       dtype=np.float64)
    return {"response_length/mean": float(lengths.mean()),
            "response_length/p50": float(np.percentile(lengths, 50)),
            "response_length/p99": float(np.percentile(lengths, 99)),
            "response_length/max": float(lengths.max())}

