"""Rollout with transformers on CPU (or one GPU): the embedded default engine."""

from __future__ import annotations

import math
import time

import torch

from rlhfless.api.wire import ActorRequest, ActorResponse, RolloutSample
from rlhfless.functions import cancel
from rlhfless.functions.device import on_device
from rlhfless.functions.versions import VersionedCache
from rlhfless.model.generation import generate
from rlhfless.model.materialize import load_from_store
from rlhfless.model.sampler import prompt_key
from rlhfless.model.tokenizer import Tokenizer
from rlhfless.store import WeightStore


class TransformersEngine:
    def __init__(self, store: WeightStore, dedup_prefill: bool = True):
        self.models = VersionedCache(store, lambda v: self._load(store, v))
        self.dedup_prefill = dedup_prefill

    @staticmethod
    def _load(store: WeightStore, version: int) -> tuple[torch.nn.Module, Tokenizer]:
        model, tok = load_from_store(store, version)
        return on_device(model), tok

    def loaded_version(self) -> int | None:
        return self.models.version

    def warm(self, version: int) -> None:
        self.models.get(version)

    def rollout(self, request: ActorRequest) -> ActorResponse:
        model, tok = self.models.get(request.weights_version)
        prompts = request.prompts
        sizes = {len(p.sample_indices) for p in prompts}
        whole_groups = (
            self.dedup_prefill
            and len(sizes) == 1
            and all(p.prefixes is None for p in prompts)
        )
        if whole_groups:
            # One prefill per prompt, expanded over its samples (deduplicated prefill).
            n = sizes.pop()
            rows = [(p, i) for p in prompts for i in p.sample_indices]
            call_prompts = [p.prompt_ids for p in prompts]
            keys = [prompt_key(p.key) for p in prompts]
            prefixes = None
        else:
            # Continuations (or dedup off): every sample is its own row with its own prefill.
            n = 1
            rows = [(p, i) for p in prompts for i in p.sample_indices]
            call_prompts = [p.prompt_ids for p, _ in rows]
            keys = [prompt_key(p.key) for p, _ in rows]
            prefixes = [
                (p.prefixes[p.sample_indices.index(i)] if p.prefixes else []) for p, i in rows
            ]
        stop_after = (
            math.ceil(request.cut_fraction * len(rows)) if request.cut_fraction else None
        )
        started = time.perf_counter()
        with torch.no_grad():
            result = generate(
                model, tok, call_prompts, n=n, max_new_tokens=request.max_new_tokens,
                temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                prefixes=prefixes, stop_after=stop_after, keys=keys,
                sample_indices=[i for _, i in rows], on_step=cancel.check,
            )
        elapsed = time.perf_counter() - started
        samples = [
            RolloutSample(key=p.key, index=i, response=s["response"], logprobs=s["logprobs"],
                          finished=s["finished"])
            for (p, i), s in zip(rows, result.samples, strict=True)
        ]
        new_tokens = sum(len(s.response) for s in samples) - sum(
            len(x) for x in (prefixes or [])
        )
        return ActorResponse(samples=samples, stats={
            "generate_s": elapsed,
            "decode_steps": float(result.steps),
            "batch_size": float(len(rows)),
            "tokens": float(new_tokens),
            "prompt_tokens": float(sum(len(p) for p in call_prompts)),
            "prefill_tokens_saved": float(result.prefill_tokens_saved),
            "finished": float(sum(s.finished for s in samples)),
        })
