"""DeepSpeed configuration for the GPU trainer (ZeRO-2/3, bf16), and the fp32 weights it saves.

`deepspeed_config` is a pure function of a few numbers: what `deepspeed.initialize(config=...)`
takes. The RL update builds its own loss per mini-batch and steps once per mini-batch, so the
"batch" fields are bookkeeping for DeepSpeed (`train_batch_size` must equal micro-batch ×
accumulation × data-parallel ranks) and accumulation stays at 1 unless the caller splits a
mini-batch itself.

Precision: with bf16 the module's parameters become bf16 and the optimizer keeps fp32 master
weights; gradients accumulate in fp32. The weight store, the reference and the actor all read
fp32 weights, so a trainer on bf16 must save the master weights: `full_fp32_state_dict`
gathers them (under ZeRO-3 too, where each rank holds a shard and the module's own tensors are
empty placeholders) with the same names and tying as `module.state_dict()`.

Gradient checkpointing is the model's (transformers' `gradient_checkpointing_enable`, switched
on by PolicyTrainer from TrainerSpec.grad_checkpointing); DeepSpeed's own activation
checkpointing API is not involved.
"""

from __future__ import annotations

from typing import Any

import torch

ZERO_STAGES = (0, 1, 2, 3)
_BUCKET = 50_000_000  # elements: DeepSpeed's comm buckets (its default 5e8 overshoots small models)


def deepspeed_config(
    zero_stage: int,
    *,
    bf16: bool = True,
    max_grad_norm: float = 1.0,
    micro_batch_size: int = 1,
    grad_accum_steps: int = 1,
    world_size: int = 1,
    lr: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict[str, Any]:
    """The `config` dict for `deepspeed.initialize` on GPU.

    lr: given, the config names DeepSpeed's AdamW (FusedAdam on GPU, DeepSpeedCPUAdam when
      offloaded: both are JIT-compiled on first use, FusedAdam needs nvcc) and the caller
      passes no optimizer object; None (recommended), the caller passes its own — torch
      AdamW (`fused=True` on CUDA) is ZeRO-supported and needs no compiler.
    offload_optimizer: ZeRO-Offload (optimizer state and step on the CPU), stage >= 1.
    offload_params: parameters on the CPU between uses (ZeRO-Infinity), stage 3 only.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage}")
    for name, value in (("micro_batch_size", micro_batch_size),
                        ("grad_accum_steps", grad_accum_steps), ("world_size", world_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage >= 1")
    if offload_params and zero_stage != 3:
        raise ValueError("offload_params needs ZeRO stage 3")
    if bf16 and zero_stage == 0:
        # Without ZeRO, DeepSpeed's bf16 path accumulates bf16 gradients and keeps its fp32
        # master copy where full_fp32_state_dict cannot reach it: train in fp32 instead.
        raise ValueError("bf16 needs ZeRO stage >= 1 (stage 0 trains in fp32: bf16=False)")

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(grad_accum_steps),
        "train_batch_size": int(micro_batch_size) * int(grad_accum_steps) * int(world_size),
        # DeepSpeed clips (it owns the partitioned fp32 gradients under ZeRO and bf16).
        "gradient_clipping": float(max_grad_norm),
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_optimization": _zero_section(zero_stage, offload_optimizer, offload_params),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # bf16 has 8 mantissa bits: summing gradients in it loses small updates.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if lr is not None:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": float(lr), "betas": list(betas), "eps": 1e-8,
                       "weight_decay": float(weight_decay)},
        }
    return config


def _zero_section(stage: int, offload_optimizer: bool, offload_params: bool) -> dict[str, Any]:
    section: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return section
    section.update(
        overlap_comm=True,
        contiguous_gradients=True,
        reduce_bucket_size=_BUCKET,
        allgather_bucket_size=_BUCKET,
    )
    if stage == 3:
        section.update(
            stage3_prefetch_bucket_size=_BUCKET,
            # small tensors (norms, biases) stay whole on every rank: fewer gathers
            stage3_param_persistence_threshold=100_000,
            stage3_max_live_parameters=1_000_000_000,
            # lets engine.save_16bit_model / consolidated state dicts gather full weights
            stage3_gather_16bit_weights_on_model_save=True,
        )
        section.pop("allgather_bucket_size")  # stage-2 knob
    if offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        section["offload_param"] = {"device": "cpu", "pin_memory": True}
    return section


def full_fp32_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` as fp32 CPU tensors, parameters taken from DeepSpeed's master
    weights when it holds them (bf16, ZeRO-1/2/3), tied names sharing one tensor (the weight
    store records them once).

    Under ZeRO-3 every rank must call this (the gather is collective).
    """
    try:
        from deepspeed.utils import safe_get_full_fp32_param
    except ImportError:  # plain torch training: the parameters are the weights
        safe_get_full_fp32_param = None  # noqa: N806

    gathered: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key not in gathered:
            full = None
            if safe_get_full_fp32_param is not None and isinstance(tensor, torch.nn.Parameter):
                full = safe_get_full_fp32_param(tensor)
            if full is None:
                full = tensor.detach()
            gathered[key] = full.detach().to("cpu", torch.float32).clone()
        out[name] = gathered[key]
    return out
