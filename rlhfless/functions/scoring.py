"""Reference and critic functions: score groups of responses with the shared-prefix forward.

With `dedup_prefill` (default) each prompt runs once and its KV cache serves all G responses;
without it every response re-reads its prompt (the naive baseline, kept for ablations).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from rlhfless.api.wire import ScoreRequest, ScoreResponse
from rlhfless.functions.device import on_device
from rlhfless.functions.versions import VersionedCache
from rlhfless.functions.vocab import Vocabulary, grouped
from rlhfless.model.logprobs import grouped_logprobs, sequence_logprobs
from rlhfless.model.materialize import load_critic_from_store, load_from_store
from rlhfless.model.value import ValueModel
from rlhfless.store import WeightStore

Scorer = Callable[[ScoreRequest], tuple[list[list[list[float]]], int]]


def _lists(groups: list[list[torch.Tensor]]) -> list[list[list[float]]]:
    return [[t.detach().float().tolist() for t in group] for group in groups]


class ScoreHandler:
    def __init__(self, stage: str, cache: VersionedCache, score: Scorer,
                 vocabulary: Vocabulary | None = None):
        self.stage = stage
        self.cache = cache
        self._score = score
        self.vocabulary = vocabulary

    def loaded_version(self) -> int | None:
        return self.cache.version

    def warm(self, latest: int) -> None:
        # The reference policy is always version 0; the critic follows the policy's version.
        self.cache.get(0 if self.stage == "reference" else latest)

    def handle(self, request: ScoreRequest) -> ScoreResponse:
        if self.vocabulary is not None:
            self.vocabulary.check(grouped(request.prompts, request.groups))
        started = time.perf_counter()
        with torch.no_grad():
            values, saved = self._score(request)
        tokens = sum(len(r) for g in request.groups for r in g)
        return ScoreResponse(values=values, stats={
            "score_s": time.perf_counter() - started,
            "tokens": float(tokens),
            "prefill_tokens_saved": float(saved),
        })


def reference_handler(store: WeightStore) -> ScoreHandler:
    cache = VersionedCache(store, lambda v: on_device(load_from_store(store, v)[0]))

    def score(request: ScoreRequest) -> tuple[list[list[list[float]]], int]:
        model = cache.get(request.weights_version)
        if request.dedup_prefill:
            out = grouped_logprobs(model, request.prompts, request.groups)
            return _lists(out), out.prefill_tokens_saved
        flat_prompts = [p for p, g in zip(request.prompts, request.groups, strict=True)
                        for _ in g]
        flat = sequence_logprobs(model, flat_prompts, [r for g in request.groups for r in g])
        it = iter(flat)
        return _lists([[next(it) for _ in g] for g in request.groups]), 0

    return ScoreHandler("reference", cache, score, Vocabulary(store))


def critic_handler(store: WeightStore) -> ScoreHandler:
    cache: VersionedCache[ValueModel] = VersionedCache(
        store, lambda v: on_device(load_critic_from_store(store, v))
    )

    def score(request: ScoreRequest) -> tuple[list[list[list[float]]], int]:
        critic = cache.get(request.weights_version)
        values = critic.grouped_values(request.prompts, request.groups)
        saved = sum(len(p) * (len(g) - 1) for p, g in zip(request.prompts, request.groups,
                                                          strict=True) if g)
        return _lists(values), saved

    return ScoreHandler("critic", cache, score, Vocabulary(store))
