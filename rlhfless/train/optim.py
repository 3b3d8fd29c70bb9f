"""One optimizer interface over plain torch AdamW and a DeepSpeed engine (ZeRO 0/2).

`backward(loss)` then `step() -> grad_norm` (gradients clipped to `max_grad_norm`; a step
with a non-finite gradient is skipped, not applied). `module` is the model; model calls go
through `run(fn, *args)` = `fn(module, *args)` (a sharded model gathers its parameters
there, see rlhfless.train.sharding). `gradient(loss)` is d loss / d params kept out of
`.grad`.
Backward calls accumulate. Where the gradients sit in the parameters' `.grad`
(`grad_access`: torch, DeepSpeed ZeRO-0) a streaming learner may also read and rescale them
(`scale_grads`) before the step: the exact whole-batch normalisation of gradients that were
accumulated group by group.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

import torch

# No weight decay: an RL step with zero advantages (all-equal rewards) must leave the
# weights alone, and the KL term already anchors the policy to the reference.
WEIGHT_DECAY = 0.0
BETAS = (0.9, 0.999)


def scale_grads(params: list[torch.nn.Parameter], factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


class Optimizer(Protocol):
    module: torch.nn.Module
    params: list[torch.nn.Parameter]
    grad_access: bool

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def gradient(self, loss: torch.Tensor, retain_graph: bool) -> list[torch.Tensor | None]: ...

    def step(self) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TorchAdamW:
    """torch.optim.AdamW with global-norm clipping."""

    backend = "torch"
    grad_access = True

    def __init__(self, module: torch.nn.Module, lr: float, max_grad_norm: float) -> None:
        self.module = module
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY
        )

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.module, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def gradient(self, loss: torch.Tensor, retain_graph: bool) -> list[torch.Tensor | None]:
        return list(torch.autograd.grad(loss, self.params, retain_graph=retain_graph,
                                        allow_unused=True))

    def scale_grads(self, factor: float) -> None:
        scale_grads(self.params, factor)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_single_process_env() -> None:
    """torch.distributed env for a one-process group (gloo on CPU) unless already set.

    A free port rather than the usual 29500, so two trainers on one machine never collide.
    """
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)


def _skip_shm_comm_build(deepspeed: Any) -> None:
    """One process has nobody to share memory with: skip DeepSpeed's shared-memory all-reduce
    op, whose JIT compile (~30-150 s on 2 busy cores) would otherwise land on the first
    initialize of every fresh trainer container. Best effort: a DeepSpeed without this probe
    table simply builds the op as before."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        return
    try:
        compatible = deepspeed.ops.__compatible_ops__
    except AttributeError:
        return
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


class DeepSpeedAdamW:
    """A DeepSpeed engine around torch AdamW; ZeRO stage 0 or 2 (one process, CPU or GPU).

    DeepSpeed would JIT-compile its shared-memory comm op on the first initialize; with one
    process it is useless, so it is skipped (see `_skip_shm_comm_build`).
    """

    backend = "deepspeed"

    def __init__(
        self, module: torch.nn.Module, lr: float, max_grad_norm: float, zero_stage: int = 0
    ) -> None:
        if zero_stage not in (0, 2):
            raise ValueError(f"DeepSpeed backend supports ZeRO stage 0 or 2, got {zero_stage}")
        ensure_single_process_env()
        import deepspeed  # heavy import, only when this backend is chosen

        _skip_shm_comm_build(deepspeed)

        self.zero_stage = zero_stage
        self.max_grad_norm = max_grad_norm
        params = [p for p in module.parameters() if p.requires_grad]
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: we build the loss
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": zero_stage},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if zero_stage == 2:
            # ZeRO-2 owns the (partitioned) gradients, so it must do the clipping.
            config["gradient_clipping"] = max_grad_norm
        client = torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=client, model_parameters=params, config=config
        )
        self.module = self.engine.module
        self.params = params
        # ZeRO-2 moves gradients into its own partitioned buffers during backward.
        self.grad_access = zero_stage == 0

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.module, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def gradient(self, loss: torch.Tensor, retain_graph: bool) -> list[torch.Tensor | None]:
        if not self.grad_access:
            raise RuntimeError("ZeRO-2 keeps its gradients partitioned: no per-loss gradient")
        return list(torch.autograd.grad(loss, self.params, retain_graph=retain_graph,
                                        allow_unused=True))

    def scale_grads(self, factor: float) -> None:
        if not self.grad_access:
            raise RuntimeError("ZeRO-2 keeps its gradients partitioned: cannot rescale them")
        scale_grads(self.params, factor)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def step(self) -> float:
        if self.zero_stage == 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
            if not math.isfinite(norm):
                self.engine.zero_grad()
                return norm
            self.engine.step()
            return norm
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _inner(self) -> torch.optim.Optimizer:
        # Stage 0: the engine's optimizer is our AdamW. Stage 2: ZeRO wraps an AdamW over its
        # flat fp32 partition (one partition in one process; the layout is a deterministic
        # function of the model). Saving only that AdamW's state keeps the checkpoint plain
        # tensors (loadable with weights_only=True); the fp32 master copy is rebuilt from the
        # model's weights when the engine starts.
        return self.optimizer if self.zero_stage == 0 else self.optimizer.optimizer

    def state_dict(self) -> dict[str, Any]:
        return self._inner().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._inner().load_state_dict(state)


def make_optimizer(
    module: torch.nn.Module, lr: float, max_grad_norm: float, trainer: Any = None,
    ranks: Any = None,
) -> Any:
    """The optimizer a TrainerSpec-like object asks for (default: plain torch); with `ranks`
    (rlhfless.train.distributed.Ranks) the model is sharded over them (FSDP2)."""
    backend = getattr(trainer, "backend", "torch") if trainer is not None else "torch"
    if ranks is not None:
        if backend != "torch":
            raise ValueError(f"a sharded learner trains with FSDP2 (backend 'torch'), not "
                             f"'{backend}'")
        from rlhfless.train.sharding import ShardedAdamW, ShardedModule

        sharded = ShardedModule(module, ranks.mesh, bf16=ranks.bf16,
                                cpu_offload=bool(getattr(trainer, "cpu_offload", False)),
                                control=ranks.control)
        return ShardedAdamW(sharded, lr, max_grad_norm)
    if backend == "torch":
        return TorchAdamW(module, lr, max_grad_norm)
    if backend == "deepspeed":
        return DeepSpeedAdamW(module, lr, max_grad_norm, int(getattr(trainer, "zero_stage", 0)))
    raise ValueError(f"unknown trainer backend '{backend}'; known: deepspeed, torch")
