"""The actor function: streamed rollout of whole GRPO groups, cut and merge on request.

`/invoke` streams: a HelloFrame once the request is accepted, a SamplesFrame whenever every
sample of a prompt this actor holds has finished, a ProgressFrame when τ of its own samples
are done, and an EndFrame (or, when cut, a CutFrame with the unfinished samples). While it
streams, `/control` takes an ActorCut (stop at the next decode step) or an ActorMerge
(continue these samples inside the running batch). Token ids outside the model's
vocabulary are refused (422) in both, naming where they sit; a caller that leaves stops the
rollout at its next decode step (`functions.cancel`).
"""

from __future__ import annotations

import threading

from pydantic import BaseModel

from rlhfless.api.wire import ActorCut, ActorMerge, ActorRequest, ControlReply
from rlhfless.functions.app import Emit, instance_name
from rlhfless.functions.engines import make_engine
from rlhfless.functions.engines.base import RolloutControl, RolloutEngine, RolloutLedger
from rlhfless.functions.vocab import Vocabulary, prompts
from rlhfless.store import WeightStore


class ActorHandler:
    stage = "actor"

    def __init__(self, engine: RolloutEngine, vocabulary: Vocabulary | None = None):
        self.engine = engine
        self.vocabulary = vocabulary
        self._lock = threading.Lock()
        self._running: RolloutControl | None = None

    @classmethod
    def from_store(cls, store: WeightStore, engine: str, dedup_prefill: bool,
                   gpus: int = 1) -> ActorHandler:
        return cls(make_engine(engine, store, dedup_prefill, gpus), Vocabulary(store))

    def loaded_version(self) -> int | None:
        return self.engine.loaded_version()

    def warm(self, latest: int) -> None:
        warm = getattr(self.engine, "warm", None)
        if warm is not None:
            warm(latest)

    def _check_ids(self, request: ActorRequest | ActorMerge) -> None:
        if self.vocabulary is not None:
            self.vocabulary.check(prompts(request.prompts))

    def stream(self, request: ActorRequest, emit: Emit) -> None:
        self._check_ids(request)  # before the first frame: a plain 422
        control = RolloutControl(request)
        with self._lock:
            self._running = control
        try:
            self.engine.rollout(request, RolloutLedger(request, emit, instance_name()),
                                control)
        finally:
            control.close()
            with self._lock:
                if self._running is control:
                    self._running = None

    def control(self, request: ActorCut | ActorMerge) -> BaseModel:
        if isinstance(request, ActorMerge):
            self._check_ids(request)  # a bad request is a 422 whatever runs
        with self._lock:
            running = self._running
        if running is None:
            return ControlReply(accepted=False, message="no rollout is running here")
        if isinstance(request, ActorCut):
            if request.rollout_id != running.rollout_id:
                return ControlReply(accepted=False, message=f"rollout {request.rollout_id!r}"
                                    " is not the one running here")
            return ControlReply(accepted=running.request_cut())
        return running.offer(request)
