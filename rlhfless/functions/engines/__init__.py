"""Rollout engines behind one contract (ActorRequest → ActorResponse), chosen by name."""

from __future__ import annotations

from collections.abc import Callable

from rlhfless.functions.engines.base import RolloutEngine
from rlhfless.registry import lookup
from rlhfless.store import WeightStore


def _transformers(store: WeightStore, dedup_prefill: bool, gpus: int) -> RolloutEngine:
    from rlhfless.functions.engines.hf import TransformersEngine

    # One device: validation refuses gpus > 1 for this engine.
    return TransformersEngine(store, dedup_prefill=dedup_prefill)


def _vllm(store: WeightStore, dedup_prefill: bool, gpus: int) -> RolloutEngine:
    # Imported only when chosen: vLLM is a GPU-image dependency.
    from rlhfless.functions.engines.vllm_engine import VLLMEngine

    parallel = {"tensor_parallel_size": gpus} if gpus > 1 else {}
    return VLLMEngine(store, enable_prefix_caching=dedup_prefill, **parallel)


ENGINES: dict[str, Callable[[WeightStore, bool, int], RolloutEngine]] = {
    "transformers": _transformers,
    "vllm": _vllm,
}


def make_engine(name: str, store: WeightStore, dedup_prefill: bool = True,
                gpus: int = 1) -> RolloutEngine:
    """The rollout engine `generation.engine` names, sharing prompt prefixes if asked, over
    the instance's `gpus` (vLLM: tensor parallelism)."""
    return lookup(ENGINES, name, "rollout engine")(store, dedup_prefill, gpus)
