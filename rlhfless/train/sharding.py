"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over the ranks of one learner instance.

Every transformer block is its own FSDP unit (its parameters are all-gathered just before it
runs and freed after); what is left (embeddings, final norm, LM head, a value head) forms the
root unit. Parameters, gradients and AdamW moments stay sharded over the ranks in fp32; on a
GPU, compute runs in bf16 (`MixedPrecisionPolicy`, gradients reduced in fp32); with
`cpu_offload` the shards and the optimizer step live in host memory.

Why a root wrapper. The shared-prefix forward does not call `model(...)`: it runs the
backbone twice (prompt, then responses on the prompt's cache) and the LM head by hand. FSDP2
manages a unit through its module's forward hooks, so `ShardedModule.run(fn, ...)` calls
`fn(model, ...)` *inside* the forward of a thin root module: the root's parameters are
gathered for the whole call, each block gathers its own as it runs, and backward reduces
each block's gradient as soon as it is done.

Lockstep. Every gather and every gradient reduction is a collective: all ranks must make the
same calls in the same order, with the same structure (rlhfless.model.logprobs always runs
both shared-prefix passes for that reason; the distributed learner gives a rank with no
share of a group a zero-weighted stand-in). Gradients are *summed* over the ranks (each rank
contributes un-normalised sums; the learner divides by the batch totals once).

The optimizer state is kept in torch AdamW's layout for the unsharded model (`state_dict`
gathers it, `load_state_dict` slices it), so a version written by N ranks resumes on any
other number of ranks, or on one rank without sharding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from rlhfless.train.optim import BETAS, WEIGHT_DECAY

# The root returns the rows `fn` split off its outputs (views), and FSDP warns on every call
# that an in-place op on them would skip its pre-backward hook. Nothing modifies them in
# place (they are padded into new tensors): silence that one message.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP_Root\) returned a view",
                        category=UserWarning)


class _Root(nn.Module):
    """The root FSDP unit: runs an arbitrary function of the wrapped model in its forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.inner, *args, **kwargs)


def block_modules(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (or of a critic around one): the
    modules whose class the model lists in `_no_split_modules`."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    blocks = [sub for sub in module.modules() if type(sub).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(module).__name__} names no transformer blocks "
                         "(_no_split_modules): cannot shard it")
    return blocks


class ShardedModule:
    """A model sharded over `mesh`; call it through `run`."""

    def __init__(self, module: nn.Module, mesh: Any, *, bf16: bool = False,
                 cpu_offload: bool = False, control: Any = None) -> None:
        if bf16:
            # A trained model's shards are the fp32 master weights (AdamW on bf16 weights
            # would lose small updates); each unit is cast to bf16 as it is gathered.
            if any(p.requires_grad for p in module.parameters()):
                module.to(torch.float32)
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                          reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        # Offloading moves shards from GPU to host memory; on the CPU they are there already.
        cpu_offload = cpu_offload and mesh.device_type == "cuda"
        offload = CPUOffloadPolicy(pin_memory=True) if cpu_offload else OffloadPolicy()
        kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": policy, "offload_policy": offload}
        for block in block_modules(module):
            fully_shard(block, **kwargs)
        self.root = _Root(module)
        fully_shard(self.root, **kwargs)
        for sub in self.root.modules():
            if isinstance(sub, FSDPModule):
                # Sum, never average: each rank brings un-normalised sums. Plain SUM also
                # keeps gloo (which has no PREMUL_SUM) usable on the CPU.
                sub.set_gradient_divide_factor(1.0)
                sub.set_force_sum_reduction_for_comms(True)
        self.module = module
        self.mesh = mesh
        self.control = control  # gloo group for host-side sums (None: the default group)
        self.cpu_offload = cpu_offload

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(model, *args, **kwargs)` with the model's parameters gathered as it needs them.
        A call without autograd frees the root's gathered parameters afterwards (with
        autograd, backward does)."""
        out = self.root(fn, *args, **kwargs)
        if not torch.is_grad_enabled():
            self.reshard()
        return out

    def reshard(self) -> None:
        """Free every gathered parameter: the next call gathers the current shards (after
        an optimizer step, never a stale copy)."""
        for sub in self.root.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """`module.state_dict()` gathered as fp32 CPU tensors, tied names sharing one tensor
        (as `full_fp32_state_dict` returns it). Collective: every rank calls it."""
        self.reshard()
        gathered: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            key = id(tensor)
            if key not in gathered:
                gathered[key] = gather_full(tensor.detach()).to("cpu", torch.float32).clone()
            out[name] = gathered[key]
        return out


def gather_full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) DTensor; collective for DTensors."""
    if not isinstance(tensor, DTensor):
        return tensor
    mesh = tensor.device_mesh
    local = tensor.to_local()
    if local.device.type != mesh.device_type:
        # CPU-offloaded shards: NCCL gathers device memory only.
        local = local.to(mesh.device_type)
        tensor = DTensor.from_local(local, mesh, tensor.placements, shape=tensor.shape,
                                    stride=tensor.stride())
    return tensor.full_tensor()


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `full`, laid out like the sharded `param` (no communication:
    every rank holds `full`)."""
    if not isinstance(param, DTensor):
        return full.to(param.device)
    local = param.to_local()
    sharded = distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh,
                                param.placements, src_data_rank=None)
    return DTensor.from_local(sharded.to_local().to(local.device), param.device_mesh,
                              param.placements, shape=param.shape, stride=param.stride())


def run_on(model: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(model, ...)`, through `ShardedModule.run` when the model is sharded."""
    if isinstance(model, ShardedModule):
        return model.run(fn, *args, **kwargs)
    return fn(model, *args, **kwargs)


class ShardedAdamW:
    """torch AdamW over a ShardedModule's shards, with global-norm clipping: the Optimizer
    interface of rlhfless.train.optim. Gradients are reachable (sharded, in `.grad`), so a
    streaming learner accumulates and rescales them as it does on one rank."""

    backend = "torch"  # the state is kept in TorchAdamW's layout: interchangeable with it
    grad_access = True

    def __init__(self, sharded: ShardedModule, lr: float, max_grad_norm: float) -> None:
        self.sharded = sharded
        self.module = sharded.module
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in sharded.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=BETAS,
                                           weight_decay=WEIGHT_DECAY)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.sharded.run(fn, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def gradient(self, loss: torch.Tensor, retain_graph: bool) -> list[torch.Tensor | None]:
        """d loss / d params (this rank's shards, summed over the ranks), left out of `.grad`.

        FSDP reduces into `.grad` as backward finishes each block, so the gradient is taken
        from there with the accumulated one set aside (`torch.autograd.grad` would see only
        the gathered copies)."""
        kept = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        loss.backward(retain_graph=retain_graph)
        grads = [p.grad for p in self.params]
        for p, g in zip(self.params, kept, strict=True):
            p.grad = g
        return grads

    def scale_grads(self, factor: float) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(factor)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        self.sharded.reshard()
        value = self._clip()
        if math.isfinite(value):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def _clip(self) -> float:
        """Global gradient norm; gradients scaled to `max_grad_norm` as torch's
        clip_grad_norm_ does. The shards are disjoint: their squares are summed on the host
        over the control group (offloaded shards never meet NCCL)."""
        import torch.distributed as dist

        grads = [p.grad for p in self.params if p.grad is not None]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        squares = torch.zeros((), dtype=torch.float64)
        for g in local:
            squares += g.detach().double().pow(2).sum().cpu()
        if dist.is_initialized():
            dist.all_reduce(squares, group=self.sharded.control)
        norm = float(squares.sqrt())
        coef = self.max_grad_norm / (norm + 1e-6)
        if math.isfinite(norm) and coef < 1.0:
            for g in local:
                g.mul_(coef)
        return norm

    def state_dict(self) -> dict[str, Any]:
        """torch AdamW's state_dict with whole (gathered) tensors. Collective."""
        state = self.optimizer.state_dict()
        return {
            "state": {idx: {key: gather_full(value).detach().to("cpu").clone()
                            if isinstance(value, torch.Tensor) else value
                            for key, value in entry.items()}
                      for idx, entry in state["state"].items()},
            "param_groups": state["param_groups"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a whole-model AdamW state (from any rank count): keep this rank's slices."""
        entries = {}
        for idx, entry in state["state"].items():
            param = self.params[int(idx)]
            entries[int(idx)] = {
                key: shard_like(value, param) if isinstance(value, torch.Tensor)
                and value.shape == param.shape else value
                for key, value in entry.items()}
        self.optimizer.load_state_dict({"state": entries,
                                        "param_groups": state["param_groups"]})
