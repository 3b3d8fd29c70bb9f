"""Rollout engines behind one contract (ActorRequest → ActorResponse), chosen by name."""

from __future__ import annotations

from collections.abc import Callable

from rlhfless.functions.engines.base import RolloutEngine
from rlhfless.registry import lookup
from rlhfless.store import WeightStore


def _transformers(store: WeightStore, dedup_prefill: bool) -> RolloutEngine:
    from rlhfless.functions.engines.hf import TransformersEngine

    return TransformersEngine(store, dedup_prefill=dedup_prefill)


def _vllm(store: WeightStore, dedup_prefill: bool) -> RolloutEngine:
    # Imported only when chosen: vLLM is a GPU-image dependency.
    from rlhfless.functions.engines.vllm_engine import VLLMEngine

    return VLLMEngine(store, enable_prefix_caching=dedup_prefill)


ENGINES: dict[str, Callable[[WeightStore, bool], RolloutEngine]] = {
    "transformers": _transformers,
    "vllm": _vllm,
}


def make_engine(name: str, store: WeightStore, dedup_prefill: bool = True) -> RolloutEngine:
    """The rollout engine `generation.engine` names, sharing prompt prefixes if asked."""
    return lookup(ENGINES, name, "rollout engine")(store, dedup_prefill)
