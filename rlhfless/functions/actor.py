"""The actor function: rollout generation for whole GRPO groups, with the cut rule."""

from __future__ import annotations

from rlhfless.api.wire import ActorRequest, ActorResponse
from rlhfless.functions.engines import make_engine
from rlhfless.functions.engines.base import RolloutEngine
from rlhfless.store import WeightStore


class ActorHandler:
    stage = "actor"

    def __init__(self, engine: RolloutEngine):
        self.engine = engine

    @classmethod
    def from_store(cls, store: WeightStore, engine: str, dedup_prefill: bool,
                   gpus: int = 1) -> ActorHandler:
        return cls(make_engine(engine, store, dedup_prefill, gpus))

    def loaded_version(self) -> int | None:
        return self.engine.loaded_version()

    def warm(self, latest: int) -> None:
        warm = getattr(self.engine, "warm", None)
        if warm is not None:
            warm(latest)

    def handle(self, request: ActorRequest) -> ActorResponse:
        return self.engine.rollout(request)
