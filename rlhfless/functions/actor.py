"""The actor function: rollout generation for whole GRPO groups, with the cut rule."""

from __future__ import annotations

from rlhfless.api.wire import ActorRequest, ActorResponse
from rlhfless.functions.engines import make_engine
from rlhfless.functions.engines.base import RolloutEngine
from rlhfless.functions.vocab import Named, Vocabulary
from rlhfless.store import WeightStore


def _token_ids(request: ActorRequest) -> Named:
    for p, prompt in enumerate(request.prompts):
        yield f"prompts[{p}].prompt_ids", prompt.prompt_ids
        for i, prefix in enumerate(prompt.prefixes or []):
            yield f"prompts[{p}].prefixes[{i}]", prefix


class ActorHandler:
    stage = "actor"

    def __init__(self, engine: RolloutEngine, vocabulary: Vocabulary | None = None):
        self.engine = engine
        self.vocabulary = vocabulary

    @classmethod
    def from_store(cls, store: WeightStore, engine: str, dedup_prefill: bool) -> ActorHandler:
        return cls(make_engine(engine, store, dedup_prefill), Vocabulary(store))

    def loaded_version(self) -> int | None:
        return self.engine.loaded_version()

    def warm(self, latest: int) -> None:
        warm = getattr(self.engine, "warm", None)
        if warm is not None:
            warm(latest)

    def handle(self, request: ActorRequest) -> ActorResponse:
        if self.vocabulary is not None:
            self.vocabulary.check(_token_ids(request))
        return self.engine.rollout(request)
