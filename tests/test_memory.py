"""The memory plan against numbers computed by hand, and the job-level check."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rlhfless.api.quantity import format_bytes, parse_quantity, quantity_bytes
from rlhfless.model.fit import check_job
from rlhfless.model.memory import (
    MARGIN,
    OVERHEAD,
    Workload,
    activation_bytes,
    estimate,
    kv_cache_bytes,
    training_state_bytes,
)
from rlhfless.model.shape import KNOWN_GGUF, ModelShape, tiny_shape
from tests.conftest import tiny_job

GIB = 2**30
P = 1_000_000_000
SMOLLM2 = KNOWN_GGUF["smollm2"]


def test_quantities():
    assert quantity_bytes("32Gi") == 32 * GIB and quantity_bytes("500M") == 500_000_000
    assert quantity_bytes("1e9") == P and parse_quantity("500m") == parse_quantity("0.5")
    assert format_bytes(1.5 * GIB) == "1.5 GiB"
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity("32GB")


def test_training_state_by_backend_and_zero_stage():
    # plain AdamW in fp32: 4 (weights) + 4 (grads) + 8 (two moments) bytes per parameter
    assert training_state_bytes(P, 4, "torch", 0, 1) == {
        "weights": 4e9, "gradients": 4e9, "optimizer": 8e9}
    # DeepSpeed ZeRO-2, fp32, one rank: its fp32 flat partition is a second copy
    assert sum(training_state_bytes(P, 4, "deepspeed", 2, 1).values()) == 20e9
    # bf16 ZeRO-3 over 8 ranks: (2 weights + 4 fp32 grads + 4 master + 8 moments) / 8
    z3 = training_state_bytes(P, 2, "deepspeed", 3, 8)
    assert z3 == {"weights": 2e9 / 8, "gradients": 4e9 / 8, "master weights": 4e9 / 8,
                  "optimizer": 8e9 / 8}
    # ZeRO-1 shards only the optimizer state (and its master copy)
    z1 = training_state_bytes(P, 2, "deepspeed", 1, 4)
    assert z1["weights"] == 2e9 and z1["gradients"] == 4e9 and z1["optimizer"] == 2e9


def test_fsdp_ranks_shard_the_whole_fp32_training_state():
    # weights, gradients and both moments in fp32, every part divided by the ranks
    assert training_state_bytes(P, 2, "fsdp", 0, 8) == {
        "weights": 4e9 / 8, "gradients": 4e9 / 8, "optimizer": 8e9 / 8}


def test_a_learner_too_big_for_one_gpu_fits_on_eight_ranks():
    model = {"source": "tiny", "tiny": {"nLayer": 24, "nEmbd": 4096, "nHead": 32,
                                        "nPositions": 512}}
    gpu = (80.0 * GIB, "test")

    def learner(gpus, **trainer):
        job = tiny_job(model=model, resources={"learner": {"gpus": gpus}}, trainer=trainer)
        report = check_job(job.spec, gpu_memory=gpu)
        est = next(e for e in report.estimates if e.stage == "learner")
        return est, [e for e in report.errors if e.startswith("resources.learner")]

    one, errors = learner(1)
    params = 24 * (12 * 4096**2 + 13 * 4096) + (128 + 512) * 4096 + 2 * 4096
    assert one.parts["optimizer"] == pytest.approx(8 * params * MARGIN, rel=1e-3)
    (message,) = errors
    assert "resources.learner.gpus (FSDP2 shards the training state over them)" in message
    eight, errors = learner(8)
    assert errors == [] and eight.fits
    for part in ("weights", "gradients", "optimizer", "frozen weights"):
        assert eight.parts[part] == pytest.approx(one.parts[part] / 8), part
    # bf16 compute on the ranks: one rank's share of the mini-batch, in half the bytes
    assert eight.parts["activations"] < one.parts["activations"] / 8
    assert eight.parts["gathered weights"] > 0 and "gathered weights" not in one.parts
    offloaded, _ = learner(8, cpuOffload=True)
    assert not {"weights", "gradients", "optimizer", "frozen weights"} & set(offloaded.parts)
    assert offloaded.total < eight.total
    # ... into the pod's host memory, which must hold every rank's shards
    job = tiny_job(model=model, resources={"learner": {"gpus": 8, "memory": "64Gi"}},
                   trainer={"cpuOffload": True})
    report = check_job(job.spec, gpu_memory=gpu)
    (host,) = [e for e in report.estimates if e.device == "host"]
    assert host.parts["optimizer"] == pytest.approx(one.parts["optimizer"])
    (message,) = [e for e in report.errors if e.startswith("resources.learner")]
    assert "per host" in message and "change resources.learner.memory" in message


def test_kv_cache_and_activations_by_hand():
    # SmolLM2: 2 (k, v) x 30 layers x 3 KV heads x 64 x 2 bytes = 23,040 bytes per token
    assert kv_cache_bytes(SMOLLM2, 1000, 2) == 23_040_000
    tiny = ModelShape(family="gpt2", vocab=128, hidden=32, layers=2, heads=2, kv_heads=2,
                      head_dim=16, intermediate=128, max_positions=96, tied=True)
    # per token and layer: (8h + 2 kv + 2 i) x 4 bytes = (256 + 64 + 256) x 4 = 2304
    assert activation_bytes(tiny, 10, 4, checkpointing=False) == 10 * 2 * 2304
    # checkpointed: each layer's input (h x 4 bytes) plus one layer recomputed
    assert activation_bytes(tiny, 10, 4, checkpointing=True) == 10 * (2 * 32 * 4 + 2304)


def test_a_training_estimate_adds_up():
    shape = tiny_shape(type("T", (), dict(vocab_size=128, n_layer=2, n_embd=32, n_head=2,
                                          n_positions=96))())
    work = Workload("train", trained=("policy",), sequences=4, group_size=4,
                    response_tokens=8)
    est = estimate("learner", "cpu", shape, work, 4)
    p = shape.params
    tokens = 4 * 8 + 1 * 88  # responses + one group's prompt (min(128, 96 - 8) tokens)
    expected = {
        "weights": 4 * p, "gradients": 4 * p, "optimizer": 8 * p,
        "activations": activation_bytes(shape, tokens, 4, False),
        "logits": 32 * 128 * (4 + 4 + 8),
    }
    for key, value in expected.items():
        assert est.parts[key] == pytest.approx(value * MARGIN), key
    assert est.parts["overhead"] == OVERHEAD["cpu"]
    assert est.total == pytest.approx(sum(expected.values()) * MARGIN + OVERHEAD["cpu"])


def test_vllm_splits_weights_and_cache_over_tensor_parallel_gpus():
    work = Workload("generate", engine="vllm", sequences=64, group_size=8, response_tokens=64)
    one = estimate("actor", "gpu", SMOLLM2, work, 2, tensor_parallel=1)
    three = estimate("actor", "gpu", SMOLLM2, work, 2, tensor_parallel=3)
    for part in ("weights", "kv cache", "activations"):
        assert three.parts[part] == pytest.approx(one.parts[part] / 3)
    # paged: one group's sequences, (128 prompt + 64) x 8 tokens, not the whole batch
    assert one.parts["kv cache"] == pytest.approx(23_040 * 192 * 8 * MARGIN)


BIG_TINY = {"source": "tiny", "tiny": {"nLayer": 48, "nEmbd": 8192, "nHead": 64,
                                       "nPositions": 512}}


def test_a_huge_tiny_model_on_a_cpu_learner_is_refused_naming_the_fields():
    job = tiny_job(model=BIG_TINY, resources={"learner": {"gpus": 0}})
    report = check_job(job.spec)
    learner = next(e for e in report.estimates if e.stage == "learner")
    # 38.67 B parameters (GPT-2 layout) x 16 bytes of fp32 AdamW state, plus the margin
    assert report.shape.params == 38_665_076_736
    assert learner.total > 16 * 38_665_076_736 and not learner.fits
    (message,) = [e for e in report.errors if e.startswith("resources.learner")]
    assert "needs ~" in message and "per cpu" in message
    assert "resources.learner.memory 32Gi" in message  # what it has, and where that is set
    assert "change resources.learner.memory" in message and "model (a smaller one)" in message


def test_defaults_and_examples_fit(tmp_path):
    from rlhfless.api.spec import load_job
    from tests.conftest import REPO

    assert check_job(tiny_job().spec).errors == []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        assert check_job(load_job(path).spec).errors == [], path


def test_tensor_parallelism_must_divide_the_heads(tmp_path):
    def job(gpus, engine="vllm", model=None):
        return tiny_job(model=model or {"source": "gguf", "path": "smollm2"},
                        generation={"maxNewTokens": 32, "engine": engine},
                        resources={"actor": {"gpus": gpus}})

    assert check_job(job(3).spec).errors == []  # 9 heads, 3 KV heads
    assert check_job(job(9).spec).errors == []  # each of the 3 KV heads replicated 3 times
    (error,) = check_job(job(2).spec).errors
    assert error.startswith("resources.actor.gpus") and "9 attention heads" in error
    # Qwen2.5-1.5B: 12 heads, 2 KV heads; 3 divides 12 but neither divides nor is a
    # multiple of 2
    from tests.test_model_shape import QWEN25_15B

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_15B))
    qwen = {"source": "hf", "path": str(tmp_path), "dtype": "bfloat16"}
    (error,) = check_job(job(3, model=qwen).spec).errors
    assert "2 KV heads" in error
    assert check_job(job(4, model=qwen).spec).errors == []
    # the transformers engine uses one GPU: allowed (the operator's tests do it), but said
    report = check_job(job(2, engine="transformers").spec)
    assert report.errors == [] and "generation.engine: vllm" in report.warnings[0]


def test_the_cli_refuses_and_explains(tmp_path):
    from rlhfless.cli import app

    job = tiny_job("huge", model=BIG_TINY, resources={"learner": {"gpus": 0}})
    path = tmp_path / "job.yaml"
    from rlhfless.api.spec import dump_job

    path.write_text(json.dumps(dump_job(job)))
    result = CliRunner().invoke(app, ["validate", str(path)])
    output = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "does not fit its resources" in output and "resources.learner:" in output
    result = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and not (tmp_path / "run").exists()  # refused before start
    ok = tmp_path / "ok.yaml"
    ok.write_text(json.dumps(dump_job(tiny_job("ok"))))
    result = CliRunner().invoke(app, ["validate", str(ok), "--gpu-memory", "24Gi"])
    output = " ".join(result.output.split())
    assert result.exit_code == 0 and "learner: ~" in output and "of 24.0 GiB" in output


def test_the_operator_checks_known_shapes_and_never_opens_spec_paths(tmp_path, monkeypatch):
    from rlhfless.model import shape as shape_module
    from rlhfless.operator.handlers import validate

    job, errors = validate({"model": BIG_TINY, "resources": {"learner": {"gpus": 0}}},
                           "huge", "ns")
    assert job is None and any(e.startswith("resources.learner") for e in errors)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))

    def opened(*args, **kwargs):
        raise AssertionError("the operator read a model file named in a spec")

    monkeypatch.setattr(shape_module, "hf_config_shape", opened)
    monkeypatch.setattr(shape_module, "read_gguf_shape", opened)
    for model in ({"source": "hf", "path": str(tmp_path)},
                  {"source": "gguf", "path": str(tmp_path / "m.gguf")}):
        job, errors = validate({"model": model, "resources": {"actor": {"gpus": 2}},
                                "generation": {"engine": "vllm"}}, "local", "ns")
        assert errors == [] and job is not None
