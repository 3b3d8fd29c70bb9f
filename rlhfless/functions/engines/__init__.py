"""Rollout engines behind one contract (ActorRequest → ActorResponse)."""

from __future__ import annotations

from rlhfless.functions.engines.base import RolloutEngine
from rlhfless.weights import WeightStore


def make_engine(name: str, store: WeightStore) -> RolloutEngine:
    if name == "transformers":
        from rlhfless.functions.engines.hf import TransformersEngine

        return TransformersEngine(store)
    if name == "vllm":
        from rlhfless.functions.engines.vllm_engine import VLLMEngine

        return VLLMEngine(store)
    raise ValueError(f"unknown rollout engine {name!r}; known: transformers, vllm")
