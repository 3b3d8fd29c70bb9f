"""Model layer: loading (tiny | HF dir | GGUF), tokenizers, sampling, shared-prefix scoring."""

from rlhfless.model.generation import GenerationResult, generate
from rlhfless.model.loading import (
    ModelLoadError,
    load_base,
    load_gguf,
    load_hf_dir,
    load_tiny,
    smollm2_gguf_path,
)
from rlhfless.model.logprobs import (
    GroupedLogprobs,
    GroupedOutput,
    grouped_forward,
    grouped_logprobs,
    sequence_logprobs,
)
from rlhfless.model.sampler import choose_tokens, prompt_key, sample_uniform
from rlhfless.model.tokenizer import CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from rlhfless.model.value import ValueModel

__all__ = [
    "CharTokenizer",
    "GenerationResult",
    "GroupedLogprobs",
    "GroupedOutput",
    "HFTokenizer",
    "ModelLoadError",
    "Tokenizer",
    "ValueModel",
    "choose_tokens",
    "generate",
    "grouped_forward",
    "grouped_logprobs",
    "load_base",
    "load_gguf",
    "load_hf_dir",
    "load_tiny",
    "load_tokenizer",
    "prompt_key",
    "sample_uniform",
    "sequence_logprobs",
    "smollm2_gguf_path",
]
