"""WeightStore: versioned, atomic, verified; the base model materialised as version 0."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import rlhfless.store.weights as weights
from rlhfless.model import CharTokenizer, load_base
from rlhfless.model.materialize import load_from_store, materialize_base
from rlhfless.store import VersionExistsError, WeightStore, WeightStoreError


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=gen), "b.bias": torch.arange(5.0)}


def tiny_spec(seed: int = 0) -> SimpleNamespace:
    tiny = SimpleNamespace(
        vocab_size=128, n_layer=2, n_embd=32, n_head=2, n_positions=64, seed=seed
    )
    return SimpleNamespace(source="tiny", path=None, gguf_file=None, tiny=tiny)


def test_round_trip_versions_and_meta(tmp_path):
    store = WeightStore(tmp_path / "store")
    assert store.versions() == [] and store.latest() is None
    path = store.save(0, tensors(0), {"step": 0})
    store.save(3, tensors(3), {"step": 3, "note": "after update"})
    assert path == tmp_path / "store" / "v0" and (path / "model.safetensors").is_file()
    assert store.versions() == [0, 3] and store.latest() == 3
    loaded, meta = store.load(3)
    assert meta == {"step": 3, "note": "after update"}
    for name, t in tensors(3).items():
        assert torch.equal(loaded[name], t)
    manifest = json.loads((store.path(3) / "manifest.json").read_text())
    assert len(manifest["files"]["model.safetensors"]["sha256"]) == 64


def test_named_parts_and_tied_tensors(tmp_path):
    store = WeightStore(tmp_path)
    shared = torch.randn(6, 2)
    fused = torch.randn(4, 3)
    policy = {
        "embed.weight": shared,
        "lm_head.weight": shared,
        "x": torch.ones(2),
        "q.weight": fused[:2],  # different views of one storage are copied apart
        "k.weight": fused[2:],
    }
    store.save_parts(1, {"model": policy, "critic": {"head.weight": torch.zeros(1, 2)}}, {})
    assert sorted(store.parts(1)) == ["critic", "model"]
    loaded, _ = store.load(1)
    assert torch.equal(loaded["lm_head.weight"], shared)
    assert loaded["lm_head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    assert torch.equal(loaded["q.weight"], fused[:2]) and torch.equal(loaded["k.weight"], fused[2:])
    assert torch.equal(store.load(1, "critic")[0]["head.weight"], torch.zeros(1, 2))
    with pytest.raises(WeightStoreError, match="no part 'ref'"):
        store.load(1, "ref")


def test_missing_and_existing_versions(tmp_path):
    store = WeightStore(tmp_path)
    store.save(0, tensors(), {})
    with pytest.raises(WeightStoreError, match=r"version 7 not found .*have: \[0\]"):
        store.load(7)
    with pytest.raises(VersionExistsError, match="never rewritten"):
        store.save(0, tensors(1), {"redo": True})
    loaded, meta = store.load(0)  # append-only: the first write stands
    assert meta == {} and torch.equal(loaded["a.weight"], tensors()["a.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["v0"]  # no temp or old dirs left over


def test_corrupt_files_are_detected(tmp_path):
    store = WeightStore(tmp_path)
    store.save(0, tensors(), {})
    file = store.path(0) / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor payload
    file.write_bytes(bytes(data))
    with pytest.raises(WeightStoreError, match="sha256"):
        store.load(0)
    file.write_bytes(bytes(data[:20]))  # truncated: caught even without the hash check
    with pytest.raises(WeightStoreError, match="corrupt"):
        store.load(0, verify=False)
    file.unlink()
    with pytest.raises(WeightStoreError, match="missing"):
        store.load(0)
    (store.path(0) / "manifest.json").write_text("{not json")
    with pytest.raises(WeightStoreError, match="corrupt manifest"):
        store.load(0)


def test_failed_save_leaves_no_partial_version(tmp_path, monkeypatch):
    store = WeightStore(tmp_path)
    store.save(0, tensors(), {})
    real_save = weights.save_file
    calls = []

    def failing_save(tensor_dict, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the first part is already on disk when the second one fails
            raise OSError("disk full")
        real_save(tensor_dict, filename, metadata=metadata)

    monkeypatch.setattr(weights, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        store.save_parts(1, {"model": tensors(1), "critic": tensors(2)}, {})
    assert len(calls) == 2
    assert store.versions() == [0] and not store.path(1).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0"]
    # a directory without manifest (e.g. a crash before publishing) is not a version
    (tmp_path / "v5").mkdir()
    assert store.versions() == [0] and store.latest() == 0


def test_materialize_tiny_base_and_reload(tmp_path):
    spec = tiny_spec(seed=4)
    store = WeightStore(tmp_path)
    v0 = materialize_base(spec, store)
    assert v0 == store.path(0) and (store.base_dir / "config.json").is_file()
    assert materialize_base(spec, store) == v0  # idempotent
    with pytest.raises(WeightStoreError, match="different base"):
        materialize_base(tiny_spec(seed=5), store)

    model, tok = load_from_store(store, 0)
    reference, _ = load_base(spec)
    assert isinstance(tok, CharTokenizer)
    assert model.lm_head.weight is model.transformer.wte.weight  # ties restored
    ids = torch.tensor([tok.encode(tok.render_prompt("hi"))])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)

    # a trainer-written version: changed weights come back from the store
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    store.save(1, model.state_dict(), {"step": 1})
    again, _ = load_from_store(store)  # latest
    assert torch.equal(
        again.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight
    )
    # parameters only (the tied lm_head is deduplicated away): the head follows the embedding
    store.save(2, dict(model.named_parameters()), {"step": 2})
    params_only, _ = load_from_store(store, 2)
    assert params_only.lm_head.weight is params_only.transformer.wte.weight
    assert torch.equal(params_only.lm_head.weight, model.lm_head.weight)
    # a version that is not this model's is refused
    store.save(3, {"x": torch.zeros(1)}, {})
    with pytest.raises(WeightStoreError, match="does not fit"):
        load_from_store(store, 3)


def test_load_from_store_needs_a_base(tmp_path):
    store = WeightStore(tmp_path)
    with pytest.raises(WeightStoreError, match="no versions"):
        load_from_store(store)
    store.save(0, tensors(), {})
    with pytest.raises(WeightStoreError, match="no base"):
        load_from_store(store, 0)
