"""Streaming rollout: N actor streams at once, each group handed on the moment it is whole.

Each actor bin holds GRPO groups (the prompt's prefill is shared by its samples): whole, or,
for a group too long for one actor, a part of its samples (`rlhfless.scheduling.units`). An
actor streams a prompt's samples as soon as all it holds are done; a prompt whose G samples
are all in (from one actor or, after a hand-off or a split, from several) goes to `on_group`
at once, while the other actors still generate.

Hand-off cut: when an actor reports τ of its own samples done and another actor is still
running, the driver cuts it; its unfinished samples (prompt + partial response, same weights
version, same per-sample random streams) are merged into the running actor with the fewest
samples in flight, and the cut actor is released at once. A sample moves at most once: an
actor that received samples is never cut, so the last actor keeps its tail. If no running
actor takes them (all finished meanwhile), they continue on a fresh actor request.

An actor whose stream breaks (its instance died) has every sample it held and had not yet
reported re-run from the start on another instance; the counter-based sampler makes the
re-run produce the very samples the lost actor would have. A sample reported twice is
counted once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from rlhfless.api.wire import (
    ActorCut,
    ActorFrame,
    ActorMerge,
    ActorRequest,
    ControlReply,
    CutFrame,
    EndFrame,
    ErrorFrame,
    HelloFrame,
    ProgressFrame,
    RolloutPrompt,
    RolloutSample,
    SamplesFrame,
)
from rlhfless.driver.records import BusyInterval
from rlhfless.runtime.base import InvocationError, Runtime, StreamBroken
from rlhfless.scheduling.migrate import handoff_target
from rlhfless.scheduling.units import BinEntry

FRAME = TypeAdapter(ActorFrame)
MAX_BROKEN = 3  # broken actor streams tolerated per initial actor before the step fails
Sample = tuple[str, int]  # (prompt key, sample index)


@dataclass(frozen=True)
class PromptItem:
    key: str
    text: str
    prompt_ids: list[int]
    meta: dict[str, object]
    max_new_tokens: int | None = None  # this prompt's own response budget, if any


@dataclass
class RolloutSettings:
    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    cut_fraction: float | None


@dataclass
class RolloutResult:
    samples: dict[str, list[RolloutSample]]
    actor_stats: list[dict[str, float]] = field(default_factory=list)
    migrated: int = 0  # samples handed off by cut actors
    migration_actors: int = 0  # actors that received them
    reruns: int = 0  # samples re-run after a broken stream
    round_work_s: list[float] = field(default_factory=list)  # slowest actor's function time
    first_group_at: float | None = None  # when the first whole group was in (epoch s)
    group_done_at: dict[str, float] = field(default_factory=dict)  # key -> whole (epoch s)
    ended_at: float = 0.0  # when the last actor stream ended (epoch s)


class LostSamplesError(RuntimeError):
    pass


@dataclass
class _Actor:
    """The driver's view of one actor stream."""

    name: str  # request id
    request: ActorRequest
    assigned: set[Sample]
    instance: str | None = None
    received: set[Sample] = field(default_factory=set)
    merged_in: bool = False
    cut: bool = False
    running: bool = True
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        return len(self.assigned - self.received)


async def invoke_timed(
    runtime: Runtime, stage: str, payload: dict, busy: list[BusyInterval]
) -> dict:
    """`runtime.invoke`, recording the call as a busy interval of `stage`."""
    start = time.time()
    try:
        return await runtime.invoke(stage, payload)
    finally:
        busy.append(BusyInterval(stage, start, time.time()))


class StreamingRollout:
    """One step's rollout; `on_group(key, samples)` gets each whole group as it completes
    (it must not block: it hands the group to the learn pipeline)."""

    def __init__(
        self,
        runtime: Runtime,
        items: Sequence[PromptItem],
        bins: Sequence[Sequence[BinEntry]],
        version: int,
        settings: RolloutSettings,
        request_prefix: str,
        busy: list[BusyInterval],
        on_group: Callable[[str, list[RolloutSample]], None] | None = None,
    ):
        self.runtime = runtime
        self.items = {item.key: item for item in items}
        self.bins = [list(b) for b in bins if b]
        self.item_list = list(items)
        self.version = version
        self.s = settings
        self.prefix = request_prefix
        self.busy = busy
        self.on_group = on_group
        self.result = RolloutResult(samples={item.key: [] for item in items})
        self.actors: list[_Actor] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: set[Sample] = set()
        self._receivers: set[str] = set()
        self._broken = 0
        self._tau_waiting: list[_Actor] = []  # reached τ while another actor was starting

    # ------------------------------------------------------------------ the run

    async def run(self) -> RolloutResult:
        cut = self.s.cut_fraction if len(self.bins) > 1 else None
        for i, bin_ in enumerate(self.bins):
            prompts = [self._entry_prompt(e) for e in bin_]
            self._spawn(f"{self.prefix}-a{i}", prompts, cut)
        try:
            while self._tasks:
                done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._tasks.discard(task)
                    task.result()  # a failed actor fails the rollout
        except BaseException:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            raise
        self.result.ended_at = time.time()
        g = self.s.group_size
        for key, samples in self.result.samples.items():
            samples.sort(key=lambda s: s.index)
            if [s.index for s in samples] != list(range(g)):
                raise LostSamplesError(f"prompt {key}: got samples {[s.index for s in samples]}")
        self.result.migration_actors = len(self._receivers)
        works = [a.stats.get("function_s", 0.0) for a in self.actors if a.stats]
        self.result.round_work_s = [max(works, default=0.0)]
        return self.result

    def _entry_prompt(self, entry: BinEntry) -> RolloutPrompt:
        """A whole group (its index) or a part of it ((index, sample indices))."""
        if isinstance(entry, (tuple, list)):
            j, indices = entry
            return self._prompt(self.item_list[int(j)].key, [int(i) for i in indices])
        return self._prompt(self.item_list[int(entry)].key, list(range(self.s.group_size)))

    def _prompt(self, key: str, indices: list[int], prefixes: list | None = None
                ) -> RolloutPrompt:
        item = self.items[key]
        return RolloutPrompt(key=key, prompt_ids=item.prompt_ids, sample_indices=indices,
                             prefixes=prefixes, max_new_tokens=item.max_new_tokens)

    def _spawn(self, name: str, prompts: list[RolloutPrompt], cut: float | None) -> None:
        request = ActorRequest(
            request_id=name, weights_version=self.version, prompts=prompts,
            max_new_tokens=self.s.max_new_tokens, temperature=self.s.temperature,
            top_p=self.s.top_p, seed=self.s.seed, cut_fraction=cut)
        actor = _Actor(name, request, {(p.key, i) for p in prompts for i in p.sample_indices})
        self.actors.append(actor)
        self._tasks.add(asyncio.create_task(self._drive(actor)))

    async def _drive(self, actor: _Actor) -> None:
        start = time.time()
        try:
            async for instance, raw in self.runtime.invoke_stream("actor",
                                                                  actor.request.model_dump()):
                actor.instance = instance
                await self._on_frame(actor, FRAME.validate_python(raw))
        except StreamBroken:
            actor.running = False
            self._rerun(actor)
        finally:
            actor.running = False
            self.busy.append(BusyInterval("actor", start, time.time(), actor.instance))
        if actor.cut and actor.instance is not None:
            await self.runtime.release_instance("actor", actor.instance)

    # ------------------------------------------------------------------ frames

    async def _on_frame(self, actor: _Actor, frame: object) -> None:
        if isinstance(frame, HelloFrame):
            # A new actor is running: one that reached τ while it started can hand off now.
            waiting, self._tau_waiting = self._tau_waiting, []
            for other in waiting:
                if other.running:
                    await self._maybe_cut(other)
            return
        if isinstance(frame, SamplesFrame):
            self._receive(actor, frame.samples)
        elif isinstance(frame, ProgressFrame):
            await self._maybe_cut(actor)
        elif isinstance(frame, CutFrame):
            actor.stats = frame.stats
            self.result.actor_stats.append(frame.stats)
            self._receive(actor, frame.finished)
            actor.running = False
            if frame.unfinished:
                await self._hand_off(actor, frame.unfinished)
        elif isinstance(frame, EndFrame):
            actor.stats = frame.stats
            self.result.actor_stats.append(frame.stats)
        elif isinstance(frame, ErrorFrame):
            raise InvocationError("actor", frame.message, frame.status)

    def _receive(self, actor: _Actor, samples: list[RolloutSample]) -> None:
        for s in samples:
            ident = (s.key, s.index)
            actor.received.add(ident)
            if ident in self._seen or s.key not in self.result.samples:
                continue  # a sample reported twice counts once
            self._seen.add(ident)
            group = self.result.samples[s.key]
            group.append(s)
            if len(group) == self.s.group_size:
                now = time.time()
                self.result.group_done_at[s.key] = now
                if self.result.first_group_at is None:
                    self.result.first_group_at = now
                if self.on_group is not None:
                    self.on_group(s.key, sorted(group, key=lambda x: x.index))

    # ------------------------------------------------------------------ cut and hand-off

    def _running_others(self, actor: _Actor) -> list[_Actor]:
        return [a for a in self.actors if a is not actor and a.running and not a.cut
                and a.instance is not None]

    async def _maybe_cut(self, actor: _Actor) -> None:
        """τ reached: cut unless it holds handed-off samples or nobody else is running."""
        if actor.merged_in or actor.cut or actor.instance is None:
            return
        if not self._running_others(actor):
            if any(a is not actor and a.running and a.instance is None for a in self.actors):
                self._tau_waiting.append(actor)  # decide when that one is up
            return  # the last actor keeps its tail
        actor.cut = True
        try:
            reply = ControlReply.model_validate(await self.runtime.invoke_instance(
                "actor", actor.instance,
                ActorCut(request_id=f"{actor.name}-cut", rollout_id=actor.name).model_dump()))
        except InvocationError:
            reply = ControlReply(accepted=False)  # its stream will tell what happened
        actor.cut = reply.accepted  # refused: it had already finished

    async def _hand_off(self, actor: _Actor, unfinished: list[RolloutSample]) -> None:
        moved = {(s.key, s.index) for s in unfinished}
        prompts = []
        for key in dict.fromkeys(s.key for s in unfinished):
            mine = [s for s in unfinished if s.key == key]
            prompts.append(self._prompt(key, [s.index for s in mine],
                                        [s.response for s in mine]))
        merge = ActorMerge(request_id=f"{actor.name}-handoff", weights_version=self.version,
                           max_new_tokens=self.s.max_new_tokens, temperature=self.s.temperature,
                           top_p=self.s.top_p, seed=self.s.seed, prompts=prompts)
        tried: set[str] = set()
        while True:
            candidates = {a.name: a.in_flight for a in self._running_others(actor)
                          if a.name not in tried}
            target_name = handoff_target(candidates)
            if target_name is None:
                break
            target = next(a for a in self.actors if a.name == target_name)
            tried.add(target_name)
            try:
                reply = ControlReply.model_validate(await self.runtime.invoke_instance(
                    "actor", target.instance or "", merge.model_dump()))
            except InvocationError:
                continue  # it went away meanwhile: the next candidate
            if reply.accepted:
                target.assigned |= moved
                target.merged_in = True
                self._receivers.add(target.name)
                self.result.migrated += len(moved)
                return
        # Nobody running takes them: continue them on a fresh actor request (never cut).
        self.result.migrated += len(moved)
        self._spawn(f"{actor.name}-cont", prompts, None)

    def _rerun(self, actor: _Actor) -> None:
        """Re-run, from the start, every sample a broken stream held and nobody reported."""
        lost = sorted(actor.assigned - self._seen)
        if not lost:
            return
        self._broken += 1
        if self._broken > MAX_BROKEN * len(self.bins):
            raise LostSamplesError(f"actor streams keep breaking; {len(lost)} samples lost")
        self.result.reruns += len(lost)
        by_key: dict[str, list[int]] = {}
        for key, index in lost:
            by_key.setdefault(key, []).append(index)
        prompts = [self._prompt(key, indices) for key, indices in by_key.items()]
        self._spawn(f"{actor.name}-rerun{self._broken}", prompts, None)
