"""What a rollout engine must do for the actor function, and the bookkeeping both share.

A rollout is streamed: the engine generates, the `RolloutLedger` turns finished samples into
frames (a prompt's samples are reported together once every one this actor holds is done),
reports τ once, and builds the closing frame; the `RolloutControl` is the thread-safe
channel through which the actor's control endpoint reaches the running loop (a cut, samples
to merge). Engines call them between decode steps, with `functions.cancel.check()` (a caller
that left ends the rollout there, reporting nothing).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np
from pydantic import BaseModel

from rlhfless.api.wire import (
    ActorMerge,
    ActorRequest,
    ControlReply,
    CutFrame,
    EndFrame,
    HelloFrame,
    ProgressFrame,
    RolloutPrompt,
    RolloutSample,
    SamplesFrame,
)
from rlhfless.scheduling.migrate import cut_threshold


class RolloutEngine(Protocol):
    """Generates GRPO groups for one actor request on the requested weights version.

    Contract (both engines, tested on the transformers one):
    - every (prompt key, sample index) asked for comes back exactly once: in a SamplesFrame
      when finished, or in the CutFrame (finished or not) when cut;
    - `prefixes` continue a sample: the reported `response` is the whole response (prefix +
      continuation) and `logprobs` covers every token of it;
    - a sample's random stream depends only on (seed, key, sample index, position), so a
      sample continued elsewhere (a hand-off) equals the uncut one;
    - the request is checked (version, lengths) before `ledger.accept()`: a bad request is
      refused as an error, never half-streamed;
    - between decode steps the engine applies `control.take()`: merged prompts join the
      running batch, a cut ends the rollout with `ledger.cut(...)`; it ends with
      `ledger.end(...)` only after `control.close_if_idle()` agreed.
    """

    def rollout(self, request: ActorRequest, ledger: RolloutLedger,
                control: RolloutControl) -> None: ...

    def loaded_version(self) -> int | None: ...


def sample(key: str, index: int, response: list[int], logprobs: list[float],
           finished: bool, finished_at: float | None = None) -> RolloutSample:
    """The wire form of one sample (`finished_at`: when it finished, Unix seconds)."""
    return RolloutSample(key=key, index=index, response=np.asarray(response, dtype="<i4"),
                         logprobs=np.asarray(logprobs, dtype="<f4"), finished=finished,
                         finished_at=finished_at)


class RolloutControl:
    """The running rollout's inbox: cut requests and samples to merge (thread-safe)."""

    def __init__(self, request: ActorRequest):
        self.rollout_id = request.request_id
        self._settings = (request.weights_version, request.seed, request.max_new_tokens,
                          request.temperature, request.top_p)
        self._lock = threading.Lock()
        self._merges: list[ActorMerge] = []
        self._cut = False
        self.closed = False

    @property
    def cut_requested(self) -> bool:
        return self._cut

    def request_cut(self) -> bool:
        with self._lock:
            if self.closed:
                return False
            self._cut = True
            return True

    def offer(self, merge: ActorMerge) -> ControlReply:
        settings = (merge.weights_version, merge.seed, merge.max_new_tokens, merge.temperature,
                    merge.top_p)
        with self._lock:
            if self.closed or self._cut:
                return ControlReply(accepted=False, message="rollout finished or being cut")
            if settings != self._settings:
                return ControlReply(accepted=False, message="different weights version or "
                                    "sampling settings than the running rollout")
            self._merges.append(merge)
            return ControlReply(accepted=True)

    def take(self) -> tuple[list[RolloutPrompt], bool]:
        """(prompts to merge, cut requested) since the last call."""
        with self._lock:
            merges, self._merges = self._merges, []
            return [p for m in merges for p in m.prompts], self._cut

    def close_if_idle(self) -> bool:
        """Close the inbox unless a merge arrived meanwhile (then keep generating)."""
        with self._lock:
            if self._merges:
                return False
            self.closed = True
            return True

    def close(self) -> None:
        with self._lock:
            self.closed = True


class RolloutLedger:
    """Which samples this actor holds, which finished, and the frames that report them."""

    def __init__(self, request: ActorRequest, emit: Callable[[BaseModel], None],
                 instance: str = ""):
        self._emit = emit
        self.instance = instance
        self.held: dict[str, set[int]] = {}
        self.done: dict[str, dict[int, RolloutSample]] = {}
        self.reported: set[tuple[str, int]] = set()
        self.own = 0
        self.own_done = 0
        self._own_keys: set[tuple[str, int]] = set()
        self.merged = 0
        self.hold(request.prompts)
        self.own = sum(len(v) for v in self.held.values())
        self._own_keys = {(k, i) for k, v in self.held.items() for i in v}
        self.tau_at = (cut_threshold(self.own, request.cut_fraction)
                       if request.cut_fraction else None)
        self._tau_sent = False
        self.accepted = False

    @property
    def in_flight(self) -> int:
        held = sum(len(v) for v in self.held.values())
        return held - sum(len(v) for v in self.done.values())

    def hold(self, prompts: list[RolloutPrompt], merged: bool = False) -> None:
        for p in prompts:
            self.held.setdefault(p.key, set()).update(p.sample_indices)
            if merged:
                self.merged += len(p.sample_indices)

    def accept(self) -> None:
        """The request is valid and running: the first frame."""
        if not self.accepted:
            self.accepted = True
            self._emit(HelloFrame(instance=self.instance))

    def finish(self, result: RolloutSample) -> None:
        """One sample finished; reports its prompt's samples once all held ones are done."""
        key = result.key
        self.done.setdefault(key, {})[result.index] = result
        if (key, result.index) in self._own_keys:
            self.own_done += 1
        if len(self.done[key]) == len(self.held[key]):
            new = [s for i, s in sorted(self.done[key].items())
                   if (key, i) not in self.reported]
            if new:
                self.reported.update((key, s.index) for s in new)
                self._emit(SamplesFrame(samples=new, in_flight=self.in_flight))
        if self.tau_at is not None and not self._tau_sent and self.own_done >= self.tau_at:
            self._tau_sent = True
            self._emit(ProgressFrame(done=self.own_done, own=self.own,
                                     in_flight=self.in_flight))

    def cut(self, unfinished: list[RolloutSample], stats: dict[str, float]) -> None:
        finished = [s for key, per in self.done.items() for i, s in sorted(per.items())
                    if (key, i) not in self.reported]
        self._emit(CutFrame(finished=finished, unfinished=unfinished,
                            stats={**stats, "merged": float(self.merged)}))

    def end(self, stats: dict[str, float]) -> None:
        self._emit(EndFrame(stats={**stats, "merged": float(self.merged)}))

