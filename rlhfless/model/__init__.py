"""Model layer: loading (tiny | HF dir | GGUF), tokenizers, sampling, shared-prefix scoring.

The names below load on first use: the memory plan (`model.fit`, `model.memory`,
`model.shape`) is arithmetic on shapes that the operator runs, and importing it must not
load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "GenerationResult": "generation", "generate": "generation",
    "ModelLoadError": "loading", "load_base": "loading", "load_gguf": "loading",
    "load_hf_dir": "loading", "load_tiny": "loading", "smollm2_gguf_path": "loading",
    "GroupedLogprobs": "logprobs", "GroupedOutput": "logprobs",
    "grouped_forward": "logprobs", "grouped_logprobs": "logprobs",
    "sequence_logprobs": "logprobs",
    "choose_tokens": "sampler", "prompt_key": "sampler", "sample_uniform": "sampler",
    "CharTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "ValueModel": "value",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'rlhfless.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rlhfless.model.{_WHERE[name]}"), name)
