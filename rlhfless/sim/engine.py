"""One inference engine with continuous batching (vLLM-like), simulated event by event.

Every iteration emits one token for each running sequence, so a request admitted at
iteration i0 with g0 tokens already generated finishes at iteration i0 + length - g0 unless it
is preempted.  The engine therefore only stops at events — a finish, a KV-cache overflow
(preemption), or an outside interruption — and charges the decode time of the iterations in
between in closed form (`costmodel.RooflineDecode.segment_time`).

Memory follows vLLM: requests are admitted first-come-first-served while their KV fits;
when growing sequences overflow the cache the most recently admitted one is preempted,
keeps its progress and is recomputed (re-prefilled) when re-admitted.  With prefix caching
the prompt of a GRPO group is computed and stored once for all its samples on this engine.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from dataclasses import dataclass, field

from rlhfless.sim.costmodel import DecodeModel, Prefill, iters_within


@dataclass
class Request:
    """One sample to generate: `length` response tokens after a `prompt_len` prompt."""

    rid: int
    group: int
    prompt_len: int
    length: int
    generated: int = 0  # progress; survives preemption and migration
    finish_time: float = math.nan
    predicted: float = 0.0  # the scheduler's length estimate (for ordering and migration)
    migrations: int = 0
    preemptions: int = 0
    kv_resident: bool = False  # its KV cache was transferred in: admission needs no prefill

    @property
    def remaining(self) -> int:
        return self.length - self.generated


@dataclass
class EngineStats:
    decode_tokens: int = 0  # tokens emitted by decode iterations (each exactly once)
    prefill_tokens: int = 0  # prompt/resumed-context tokens computed (cache misses only)
    prefill_saved: int = 0  # prompt tokens served from the prefix cache
    busy_s: float = 0.0  # seconds with work in flight (decode or prefill)
    preemptions: int = 0
    finished: int = 0


@dataclass
class _Slot:
    req: Request
    it0: int
    g0: int
    finish_it: int


@dataclass(eq=False)  # identity, not field-by-field equality
class Engine:
    eid: int
    decode: DecodeModel
    prefill: Prefill
    kv_capacity: int
    max_seqs: int = 1024
    prefix_cache: bool = True
    start: float = 0.0
    # Admit only if the batch can then grow this many tokens per sequence before it overflows:
    # vLLM's free-block watermark + "no admission in a step that preempted", which stop
    # admit/preempt thrashing.
    growth_reserve: int = 32
    t: float = field(init=False)
    it: int = field(init=False, default=0)
    version: int = field(init=False, default=0)
    stats: EngineStats = field(init=False, default_factory=EngineStats)
    assigned: int = field(init=False, default=0)
    last_finish: float = field(init=False)

    def __post_init__(self) -> None:
        self.t = self.start
        self.last_finish = self.start
        self._running: dict[int, _Slot] = {}  # insertion order = admission order
        self._heap: list[tuple[int, int]] = []  # (finish iteration, rid), lazily invalidated
        self._waiting: deque[Request] = deque()
        self._batch = 0
        self._ctx_const = 0.0  # context read per iteration = _ctx_const + batch·it
        self._kv_const = 0.0  # KV tokens held = _kv_const + batch·it
        self._refs: Counter[int] = Counter()  # running samples per group (shared prompt KV)
        self._cached: set[int] = set()  # groups whose prompt KV was computed here

    # ---- queries -------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self._batch

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return self._batch == 0 and not self._waiting

    def unfinished(self) -> int:
        return self._batch + len(self._waiting)

    def kv_used(self) -> float:
        return self._kv_const + self._batch * self.it

    def next_event_time(self) -> float:
        if self._batch == 0:
            return math.inf
        k = self._next_event_it() - self.it
        return self.t + self.decode.segment_time(self._batch, self._ctx(), k)

    # ---- mutation ------------------------------------------------------------------------
    def add(self, reqs: list[Request], now: float, stall_s: float = 0.0) -> None:
        """Queue requests (in the given order) at global time `now` and admit what fits;
        `stall_s` pauses the engine first (e.g. to receive migrated KV caches)."""
        if self.idle:
            self.t = max(self.t, now)
        self.t += stall_s
        self.stats.busy_s += stall_s
        self._waiting.extend(reqs)
        self.assigned += len(reqs)
        self.version += 1
        self._admit()

    def step(self) -> list[Request]:
        """Run to the next internal event (finish or overflow); return the finished requests."""
        target = self._next_event_it()
        self._run_iterations(target - self.it)
        done: list[Request] = []
        while self._heap and self._heap[0][0] <= self.it:
            fit, rid = self._heap[0]
            slot = self._running.get(rid)
            if slot is None or slot.finish_it != fit:
                heapq.heappop(self._heap)
                continue
            done.append(self._finish(rid))
        while self._batch > 1 and self.kv_used() > self.kv_capacity:
            self._preempt_last()
        self.version += 1
        self._admit()
        return done

    def advance_to(self, now: float) -> None:
        """Process events up to `now`, then run the iterations that fit before it."""
        while self._batch and self.next_event_time() <= now:
            self.step()
        if self._batch == 0:
            self.t = max(self.t, now)
            return
        k_max = self._next_event_it() - self.it - 1
        k = iters_within(self.decode, self._batch, self._ctx(), now - self.t, k_max)
        self._run_iterations(k)
        self.t = max(self.t, now)  # the iteration in flight at `now` is abandoned (≤1 token)
        self.version += 1

    def take_unfinished(self) -> list[Request]:
        """Remove every unfinished request (keeping its progress), e.g. to migrate it."""
        out: list[Request] = []
        while self._running:
            rid = next(reversed(self._running))
            out.append(self._remove(rid))
        out.reverse()
        out.extend(self._waiting)
        self._waiting.clear()
        self.assigned -= len(out)
        self.version += 1
        return out

    # ---- internals -----------------------------------------------------------------------
    def _ctx(self) -> float:
        return self._ctx_const + self._batch * self.it

    def _next_event_it(self) -> int:
        while True:
            fit, rid = self._heap[0]
            slot = self._running.get(rid)
            if slot is not None and slot.finish_it == fit:
                break
            heapq.heappop(self._heap)
        nxt = fit
        if self._batch > 1 and self._kv_const + self._batch * fit > self.kv_capacity:
            overflow = math.floor((self.kv_capacity - self._kv_const) / self._batch) + 1
            nxt = min(nxt, max(overflow, self.it + 1))
        return nxt

    def _run_iterations(self, k: int) -> None:
        if k <= 0:
            return
        dt = self.decode.segment_time(self._batch, self._ctx(), k)
        self.t += dt
        self.stats.busy_s += dt
        self.it += k

    def _prompt_kv_needed(self, r: Request) -> float:
        if not self.prefix_cache:
            return r.prompt_len
        return 0.0 if self._refs[r.group] > 0 else r.prompt_len

    def _admit(self) -> None:
        prefill_s = 0.0
        while self._waiting and self._batch < self.max_seqs:
            r = self._waiting[0]
            need = self._prompt_kv_needed(r) + r.generated
            reserve = (self._batch + 1) * self.growth_reserve
            if self._batch > 0 and self.kv_used() + need + reserve > self.kv_capacity:
                break
            self._waiting.popleft()
            hit = self.prefix_cache and r.group in self._cached
            new_tokens = r.generated + (0 if hit else r.prompt_len)
            cached_tokens = r.prompt_len if hit else 0
            if r.kv_resident:  # migrated with its KV cache: nothing to recompute
                new_tokens, cached_tokens, r.kv_resident = 0, 0, False
            prefill_s += self.prefill.time(new_tokens, cached_tokens)
            self.stats.prefill_tokens += new_tokens
            self.stats.prefill_saved += cached_tokens
            if self.prefix_cache:
                self._cached.add(r.group)
            self._kv_const += self._prompt_kv_needed(r) + r.generated - self.it
            self._refs[r.group] += 1
            self._ctx_const += r.prompt_len + r.generated - self.it
            self._batch += 1
            fit = self.it + r.remaining
            self._running[r.rid] = _Slot(r, self.it, r.generated, fit)
            heapq.heappush(self._heap, (fit, r.rid))
        if prefill_s:
            self.t += prefill_s
            self.stats.busy_s += prefill_s
            self.version += 1

    def _remove(self, rid: int) -> Request:
        slot = self._running.pop(rid)
        r = slot.req
        g = slot.g0 + (self.it - slot.it0)
        self.stats.decode_tokens += g - slot.g0
        r.generated = g
        self._batch -= 1
        self._ctx_const -= r.prompt_len + slot.g0 - slot.it0
        self._kv_const -= slot.g0 - slot.it0
        self._refs[r.group] -= 1
        if not self.prefix_cache or self._refs[r.group] == 0:
            self._kv_const -= r.prompt_len
        if self._refs[r.group] == 0:
            del self._refs[r.group]
        return r

    def _finish(self, rid: int) -> Request:
        heapq.heappop(self._heap)
        r = self._remove(rid)
        r.finish_time = self.t
        self.last_finish = self.t
        self.stats.finished += 1
        return r

    def _preempt_last(self) -> None:
        rid = next(reversed(self._running))
        r = self._remove(rid)
        r.preemptions += 1
        self.stats.preemptions += 1
        self._waiting.appendleft(r)
