"""The base model in the store (version 0) and models rebuilt from stored versions.

`materialize_base` turns a ModelSpec (tiny | hf | gguf) into the store's `base/` folder and
version 0 once; every stage function then rebuilds models with `load_from_store` without the
original source (a GGUF is dequantised once, not in every function).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from rlhfless.store import DEFAULT_PART, WeightStore, WeightStoreError
from rlhfless.store.atomic import atomic_dir


def _spec_record(spec: Any) -> dict[str, Any]:
    tiny = getattr(spec, "tiny", None)
    tiny_record = None
    if spec.source == "tiny" and tiny is not None:
        fields = ("vocab_size", "n_layer", "n_embd", "n_head", "n_positions", "seed")
        tiny_record = {k: getattr(tiny, k) for k in fields}
    return {
        "source": spec.source,
        "path": getattr(spec, "path", None),
        "gguf_file": getattr(spec, "gguf_file", None),
        "tiny": tiny_record,
    }


def materialize_base(
    spec: Any, store: WeightStore, loaded: tuple[torch.nn.Module, Any] | None = None
) -> Path:
    """Write the base model as version 0 (+ base/ config and tokenizer); returns v0's dir.

    Idempotent: a store that already holds this base returns at once; one holding a different
    base is an error. Afterwards `load_from_store` rebuilds the model without the original
    source (a GGUF is dequantised once here, not in every stage function). `loaded` is the
    (model, tokenizer) of `spec` when the caller already has it (skips a second load).
    """
    record = _spec_record(spec)
    base_json = store.base_dir / "base.json"
    if base_json.is_file() and store.exists(0):
        stored = json.loads(base_json.read_text())["spec"]
        if stored != record:
            raise WeightStoreError(
                f"weight store {store.root} already holds a different base model: {stored}"
            )
        return store.path(0)
    if store.exists(0) and store.meta(0).get("base") != record:
        # v0 is never rewritten (the store is append-only), only its base/ folder rebuilt.
        raise WeightStoreError(f"weight store {store.root} already holds a different base "
                               f"model: {store.meta(0).get('base')}")

    from rlhfless.model.loading import load_base

    model, tok = loaded if loaded is not None else load_base(spec)
    # A dequantised GGUF still carries its quantization_config; the stored weights are
    # plain floats, so drop it (otherwise transformers refuses to save or misloads).
    config = copy.deepcopy(model.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if store.base_dir.exists():
        shutil.rmtree(store.base_dir)  # a base without v0 is a leftover of a failed run
    with atomic_dir(store.base_dir) as tmp:
        config.save_pretrained(str(tmp))
        tok.save(tmp / "tokenizer")
        info = {
            "spec": record,
            "architecture": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "tokenizer": tok.kind,
        }
        (tmp / "base.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    if store.exists(0):
        return store.path(0)
    return store.save(0, model.state_dict(), {"base": record})


def load_from_store(
    store: WeightStore, version: int | None = None, part: str = DEFAULT_PART
) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer) for a stored version (default: the latest)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhfless.model.tokenizer import load_tokenizer

    if version is None:
        version = store.latest()
        if version is None:
            raise WeightStoreError(f"weight store {store.root} holds no versions")
    base = store.base_dir
    if not (base / "config.json").is_file():
        raise WeightStoreError(f"weight store {store.root} has no base (run materialize_base)")
    tensors, _ = store.load(version, part)
    info = json.loads((base / "base.json").read_text())
    config = AutoConfig.from_pretrained(str(base), local_files_only=True)
    dtype = getattr(torch, info.get("dtype", "float32"))
    # Parameters on the meta device (no random init), then adopt the stored tensors.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()  # a tied lm_head may be absent from the tensors; it follows the embedding
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing or result.unexpected_keys:
        raise WeightStoreError(
            f"version {version} does not fit the base model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval(), load_tokenizer(base / "tokenizer")


CRITIC_PART = "critic"


def load_critic_from_store(store: WeightStore, version: int) -> Any:
    """The critic (a ValueModel) of `version`; a version without one gets a fresh critic on
    the base model."""
    from rlhfless.model.value import ValueModel

    backbone, _ = load_from_store(store, 0)
    critic = ValueModel(backbone, seed=0)
    if CRITIC_PART in store.parts(version):
        tensors, _ = store.load(version, CRITIC_PART)
        critic.load_state_dict(tensors)
    return critic.eval()
