"""The learner over N ranks of one instance: process group, shares, the distributed update.

Every rank runs a `DistributedStreamingLearner` on the same requests, in the same order
(rlhfless.train.ranks relays them from rank 0, which serves HTTP). The models are sharded
with FSDP2 (rlhfless.train.sharding). Work is split like this:

- each arriving group: every rank receives the whole group (prompt, responses, rewards) and
  takes a contiguous share of its responses, separately for the responses of the streamed
  first mini-batch and for the rest (`Ranks.share`); GRPO advantages need only the rewards,
  so every rank computes them for the whole group;
- the streamed gradient: each rank back-propagates the *un-normalised* sums of its share;
  FSDP sums the gradients over the ranks as backward goes; the loss sums, token counts and
  PPO's whitening statistics are summed over the ranks once at `finish` (`Ranks.sum`), so
  the whole-batch normalisation stays exact; ONE optimizer step follows;
- later mini-batches and PPO epochs (`DistributedPolicyTrainer`): every rank takes a share
  of each mini-batch and divides its sums by the mini-batch's global denominator; the
  per-response forward-only results (old/reference log-probs, values) are exchanged first.

A rank whose share of something is empty still makes the same calls on a zero-weighted
stand-in (a response of the group), because every FSDP gather and reduction is collective.
The result equals the one-rank update up to float summation order; a rank count change
between steps is fine (the optimizer state is stored whole, see ShardedAdamW).

NCCL carries the tensors on GPUs, gloo on the CPU; the small sums and the per-response
exchange always go over a gloo group (host memory).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import Tensor

from rlhfless.algo import aggregate, kl_penalty, value_loss
from rlhfless.algo.ops import aggregation_denominator, aggregation_weight
from rlhfless.train.batch import TrainBatch, pad_ragged
from rlhfless.train.sharding import ShardedModule
from rlhfless.train.streaming import StreamingLearner
from rlhfless.train.update import Item, PolicyTrainer, _gather, _regroup, pad_grad

T = TypeVar("T")
# A rank waits this long in one collective before giving up (a first step on a big model,
# gathering the weights to publish, may take minutes; a dead peer is noticed sooner, see
# rlhfless.train.ranks).
COLLECTIVE_TIMEOUT_S = 1800


def split_evenly(n: int, world: int) -> list[range]:
    """Contiguous, near-equal parts of range(n), one per rank (the first n % world ranks
    get one more), as numpy.array_split cuts."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    base, extra = divmod(max(n, 0), world)
    out, start = [], 0
    for r in range(world):
        size = base + (1 if r < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def share_of(items: Sequence[T], rank: int, world: int) -> tuple[list[T], bool]:
    """Rank `rank`'s part of `items` and whether it is a stand-in: a rank whose part is empty
    (fewer items than ranks) gets the first item, to be computed with weight 0."""
    mine = [items[i] for i in split_evenly(len(items), world)[rank]]
    if not mine and items:
        return [items[0]], True
    return mine, False


@dataclass
class Ranks:
    """This process's place in the learner instance's ranks."""

    rank: int
    world: int
    device: torch.device
    mesh: Any = None  # torch DeviceMesh over all ranks (FSDP2)
    control: Any = None  # gloo process group for sums and small objects

    @property
    def bf16(self) -> bool:
        """Compute in bf16 (fp32 master shards and gradient reduction): on GPUs only; the
        CPU path stays fp32, where it is compared bit for bit with one rank."""
        return self.device.type == "cuda"

    def share(self, items: Sequence[T]) -> tuple[list[T], bool]:
        return share_of(items, self.rank, self.world)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(tensor, group=self.control)
        return tensor.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        import torch.distributed as dist

        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out


def init_ranks(rank: int, world: int, address: str, port: int, *,
               device_type: str | None = None,
               timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Ranks:
    """Join the instance's process group (NCCL on GPUs, gloo on the CPU); rank r uses
    GPU r of those the instance was given (CUDA_VISIBLE_DEVICES)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    os.environ.setdefault("MASTER_ADDR", address)  # libraries that read it (DeepSpeed)
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    mesh = init_device_mesh(device_type, (world,))
    control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return Ranks(rank=rank, world=world, device=device, mesh=mesh, control=control)


def close_ranks() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shard_frozen(model: torch.nn.Module, ranks: Ranks, cpu_offload: bool = False) -> ShardedModule:
    """A model without gradients (the reference policy) sharded like the trained ones."""
    for p in model.parameters():
        p.requires_grad_(False)
    return ShardedModule(model.eval(), ranks.mesh, bf16=ranks.bf16, cpu_offload=cpu_offload,
                         control=ranks.control)


def _weights(lengths: list[int], width: int, agg: str, device: torch.device) -> Tensor:
    rows = [torch.full((n,), aggregation_weight(n, agg)) for n in lengths]
    return pad_ragged(rows, width)[0].to(device)


class DistributedPolicyTrainer(PolicyTrainer):
    """PolicyTrainer over sharded models whose every mini-batch is split over the ranks.

    Each rank computes its share's loss as a weighted token sum divided by the *mini-batch's*
    denominator (rlhfless.algo.ops.aggregation_denominator over all its responses), so the
    summed gradient is the whole mini-batch's. Statistics are summed (losses) or token-
    weighted (means) over the ranks. The batch must bring its old log-probs (and old values):
    the streaming learner computes them as groups arrive.
    """

    def __init__(self, model: torch.nn.Module, algo: Any, trainer: Any, ranks: Ranks,
                 critic: torch.nn.Module | None = None, seed: int = 0,
                 policy_loss: str = "ppo_clip") -> None:
        super().__init__(model, algo, trainer, critic, seed=seed, policy_loss=policy_loss,
                         ranks=ranks)

    def step(self, batch: TrainBatch, shuffle_seed: int | None = None,
             first_done: dict[str, float] | None = None) -> dict[str, float]:
        if batch.old_logprobs is None or (self.critic is not None and batch.old_values is None):
            raise ValueError("a distributed update needs the batch's old log-probs (and old "
                             "values): score it first")
        return super().step(batch, shuffle_seed, first_done)

    def _masks(self, batch: TrainBatch, mb: list[Item], mine: list[Item], stand_in: bool,
               width: int, device: torch.device) -> tuple[Tensor, Tensor, float]:
        """(0/1 mask and loss weights of this rank's items, the mini-batch's denominator);
        a stand-in's mask and weights are zero."""
        scale = 0.0 if stand_in else 1.0
        lengths = [len(batch.groups[p][i]) for p, i in mine]
        mask = pad_ragged([torch.ones(n) for n in lengths], width)[0].to(device) * scale
        weights = _weights(lengths, width, self.algo.loss_agg, device) * scale
        denom = aggregation_denominator([len(batch.groups[p][i]) for p, i in mb],
                                        self.algo.loss_agg, width)
        return mask, weights, denom

    def _policy_update(self, batch: TrainBatch, mb: list[Item], old_logprobs: Any,
                       width: int) -> dict[str, float]:
        algo = self.algo
        mine, stand_in = self.ranks.share(mb)
        prompts, groups = _regroup(batch, mine)
        logp_rows, ent_rows = self.logprobs_and_entropy(prompts, groups)
        logp = pad_grad(logp_rows, width)
        entropy = pad_grad(ent_rows, width)
        device = logp.device
        mask, weights, denom = self._masks(batch, mb, mine, stand_in, width, device)
        adv = _gather(batch.advantages, mine, width, device)
        old = _gather(old_logprobs, mine, width, device)
        pg_sum, _ = self._loss_fn(logp, old, adv, weights, clip_eps=algo.clip_eps,
                                  agg="token-sum")
        with torch.no_grad():
            _, means = self._loss_fn(logp.detach(), old, adv, mask, clip_eps=algo.clip_eps,
                                     agg=algo.loss_agg)
        loss = pg_sum
        kl_sum = torch.zeros((), device=device)
        if batch.ref_logprobs is not None:
            ref = _gather(batch.ref_logprobs, mine, width, device)
            kl_sum = aggregate(kl_penalty(logp, ref, algo.kl_estimator), weights, "token-sum")
            if algo.kl_beta > 0:
                loss = loss + algo.kl_beta * kl_sum
        ent_sum = aggregate(entropy, weights, "token-sum")
        if algo.entropy_coef > 0:
            loss = loss - algo.entropy_coef * ent_sum
        self._policy.backward(loss / denom)
        grad_norm = self._policy.step()
        tokens = float(mask.sum())
        names = sorted(means)
        totals = self.ranks.sum(
            [float(loss.detach()), float(pg_sum.detach()), float(kl_sum.detach()),
             float(ent_sum.detach()), float((logp.detach() * mask).sum()), tokens]
            + [means[k] * tokens for k in names])
        loss_t, pg_t, kl_t, ent_t, logp_t, tokens_t = totals[:6]
        stats = {k: v / max(tokens_t, 1.0) for k, v in zip(names, totals[6:], strict=True)}
        stats.update({
            "loss": loss_t / denom, "pg_loss": pg_t / denom, "entropy": ent_t / denom,
            "grad_norm": grad_norm, "skipped_steps": 0.0 if math.isfinite(grad_norm) else 1.0,
            "logprob_mean": logp_t / max(tokens_t, 1.0),
        })
        if batch.ref_logprobs is not None:
            stats["kl"] = kl_t / denom
        return stats

    def _critic_update(self, batch: TrainBatch, mb: list[Item], old_values: Any,
                       width: int) -> dict[str, float]:
        assert self._critic is not None and batch.returns is not None
        mine, stand_in = self.ranks.share(mb)
        prompts, groups = _regroup(batch, mine)
        rows = [v for grp in self.critic_values(prompts, groups) for v in grp]
        values = pad_grad(rows, width)
        device = values.device
        mask, weights, denom = self._masks(batch, mb, mine, stand_in, width, device)
        returns = _gather(batch.returns, mine, width, device)
        old = _gather(old_values, mine, width, device)
        loss_sum, _ = value_loss(values, old, returns, weights, clip=self.algo.value_clip,
                                 agg="token-sum")
        with torch.no_grad():
            _, means = value_loss(values.detach(), old, returns, mask,
                                  clip=self.algo.value_clip, agg=self.algo.loss_agg)
        self._critic.backward(loss_sum / denom)
        grad_norm = self._critic.step()
        tokens = float(mask.sum())
        names = sorted(means)
        totals = self.ranks.sum([float(loss_sum.detach()), tokens]
                                + [means[k] * tokens for k in names])
        stats = {k: v / max(totals[1], 1.0) for k, v in zip(names, totals[2:], strict=True)}
        stats.update(critic_grad_norm=grad_norm, value_loss=totals[0] / denom)
        return stats


class DistributedStreamingLearner(StreamingLearner):
    """The streaming learner every rank of a multi-rank instance runs (see the module doc).

    `trainer` is a DistributedPolicyTrainer; `reference`, when given, a ShardedModule
    (`shard_frozen`).
    """

    def __init__(self, trainer: DistributedPolicyTrainer, algo: Any, group_size: int,
                 reference: ShardedModule | None = None) -> None:
        super().__init__(trainer, algo, group_size, reference)
        self.ranks: Ranks = trainer.ranks

    def _share(self, indices: list[int]) -> tuple[list[int], bool]:
        return self.ranks.share(indices)

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        return self.ranks.sum(values)

    def _complete(self) -> None:
        """Exchange the per-response rows each rank computed (old and reference log-probs,
        values, returns and, for PPO, raw advantages) so every rank holds the whole batch
        for the mini-batches after the first."""
        fields = ["old_logprobs", "ref_logprobs", "values", "returns"]
        if self.whiten:
            fields.append("advantages")
        mine = {gid: [(i, {f: getattr(g, f)[i] for f in fields if getattr(g, f) is not None})
                      for i in sorted(g.mine)]
                for gid, g in self.groups.items()}
        for part in self.ranks.gather(mine):
            for gid, rows in part.items():
                group = self.groups[gid]
                for i, row in rows:
                    for name, tensor in row.items():
                        getattr(group, name)[i] = tensor
