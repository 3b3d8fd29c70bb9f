"""The in-process policy (and critic) update: ppo_epochs x mini-batches over one TrainBatch.

Forward passes use the model layer's shared-prefix scoring, so a GRPO group's prompt is
computed once per mini-batch and its gradient gathers all G responses. Mini-batches hold
`mini_batch_size` responses; prompts are shuffled per epoch but a group's responses stay
together, so prefix sharing survives the shuffle. The shuffle is seeded from the RL step
(`step_seed`), never from the weights version a trainer happened to load, so a learner that
restarted mid-step partitions the batch exactly as the first one did.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from rlhfless.algo import (
    aggregate,
    entropy_from_logits,
    get_policy_loss,
    kl_penalty,
    masked_mean,
    value_loss,
)
from rlhfless.model.batching import token_logprobs
from rlhfless.model.checkpointing import enable_checkpointing
from rlhfless.model.logprobs import grouped_forward, grouped_logprobs
from rlhfless.train.batch import Ragged, TrainBatch, pad_ragged
from rlhfless.train.optim import make_optimizer

Item = tuple[int, int]  # (prompt index, response index) into a TrainBatch


def step_seed(job_seed: int, step: int) -> int:
    """The mini-batch shuffle seed of RL step `step`."""
    return (int(job_seed) * 1_000_003 + int(step)) % (2**63)


def minibatches(
    n_prompts: int, items: list[Item], epoch: int, seed: int, size: int
) -> list[list[Item]]:
    """Epoch `epoch`'s mini-batches: prompts shuffled (seeded), each group's items kept
    together and in order, cut every `size` responses."""
    gen = torch.Generator().manual_seed((int(seed) * 1009 + epoch) % (2**63))
    order = torch.randperm(n_prompts, generator=gen).tolist()
    rank = {p: k for k, p in enumerate(order)}
    shuffled = sorted(items, key=lambda it: (rank[it[0]], it[1]))
    return [shuffled[start : start + size] for start in range(0, len(shuffled), size)]


def _regroup(batch: TrainBatch, items: list[Item]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Consecutive items of one prompt become one group (one shared prefix)."""
    prompts: list[list[int]] = []
    groups: list[list[list[int]]] = []
    last = None
    for p, i in items:
        if p != last:
            prompts.append(batch.prompts[p])
            groups.append([])
            last = p
        groups[-1].append(batch.groups[p][i])
    return prompts, groups


def pad_grad(rows: list[Tensor], width: int) -> Tensor:
    """Right-pad differentiable 1-D tensors to [B, width] (keeps the autograd graph)."""
    mat = pad_sequence(rows, batch_first=True)
    if mat.shape[1] < width:
        mat = torch.nn.functional.pad(mat, (0, width - mat.shape[1]))
    return mat


@contextmanager
def eval_mode(module: torch.nn.Module | None) -> Iterator[None]:
    """Score in eval mode: transformers drops the KV cache of checkpointed layers in
    training mode even without grad, which would break the shared-prefix pass."""
    if module is None or not module.training:
        yield
        return
    module.eval()
    try:
        yield
    finally:
        module.train()


def _mask(batch: TrainBatch, items: list[Item], width: int, device: torch.device) -> Tensor:
    rows = [torch.zeros(len(batch.groups[p][i])) for p, i in items]
    return pad_ragged(rows, width)[1].to(device)


def _gather(ragged: Ragged, items: list[Item], width: int, device: torch.device) -> Tensor:
    # Batch tensors live on the CPU (they arrive as JSON); move each mini-batch's slice only.
    return pad_ragged([ragged[p][i].float().cpu() for p, i in items], width)[0].to(device)


def _logprobs_and_entropy(model: torch.nn.Module, prompts, groups,
                          entropy_grad: bool) -> tuple[list[Tensor], list[Tensor]]:
    hidden = grouped_forward(model, prompts, groups, logprobs=False, hidden=True).hidden
    assert hidden is not None
    states = torch.cat([h for grp in hidden for h in grp], dim=0)
    responses = [r for grp in groups for r in grp]
    targets = torch.tensor([t for r in responses for t in r], device=states.device)
    logits = model.get_output_embeddings()(states)
    logp = token_logprobs(logits, targets)
    if entropy_grad:
        ent = entropy_from_logits(logits)
    else:
        with torch.no_grad():  # monitoring only: keep it out of the graph
            ent = entropy_from_logits(logits.detach())
    lengths = [len(r) for r in responses]
    return list(logp.split(lengths)), list(ent.split(lengths))


def _grouped_values(critic: torch.nn.Module, prompts, groups) -> list[list[Tensor]]:
    return critic.grouped_values(prompts, groups)


class PolicyTrainer:
    """GRPO / PPO update of `model` (and `critic`, for PPO) with AdamW or DeepSpeed.

    `algo` is an AlgorithmSpec-like object (name, clip_eps, kl_beta, kl_estimator, loss_agg,
    lr, critic_lr, ppo_epochs, mini_batch_size, entropy_coef, value_clip, max_grad_norm) and
    `trainer` a TrainerSpec-like one (backend, zero_stage, grad_checkpointing). The critic is
    an nn.Module with `grouped_values(prompts, groups) -> list[list[Tensor]]`
    (rlhfless.model.value.ValueModel). `seed` drives the mini-batch shuffle when `step` is
    not given a `shuffle_seed` (pass `step_seed(job_seed, step)`; the learner does).
    `ranks` (rlhfless.train.distributed.Ranks): shard the models over these ranks (FSDP2,
    rlhfless.train.sharding); every model call goes through the optimizer's `run`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        algo: Any,
        trainer: Any = None,
        critic: torch.nn.Module | None = None,
        seed: int = 0,
        policy_loss: str = "ppo_clip",
        ranks: Any = None,
    ) -> None:
        if algo.name == "ppo" and critic is None:
            raise ValueError("ppo needs a critic (a ValueModel)")
        self.algo = algo
        self.seed = seed
        self.steps_done = 0
        self._loss_fn = get_policy_loss(policy_loss)
        if trainer is not None and getattr(trainer, "grad_checkpointing", False):
            for module in (model, getattr(critic, "backbone", None)):
                if module is not None:
                    enable_checkpointing(module)
        self.ranks = ranks
        self._policy = make_optimizer(model, algo.lr, algo.max_grad_norm, trainer, ranks)
        self._critic = (
            make_optimizer(critic, algo.critic_lr, algo.max_grad_norm, trainer, ranks)
            if critic is not None
            else None
        )

    @property
    def model(self) -> torch.nn.Module:
        return self._policy.module

    @property
    def critic(self) -> torch.nn.Module | None:
        return self._critic.module if self._critic is not None else None

    @property
    def policy_optimizer(self) -> Any:
        return self._policy

    @property
    def critic_optimizer(self) -> Any:
        return self._critic

    @property
    def policy_loss(self) -> Any:
        """The registered surrogate (rlhfless.algo.POLICY_LOSSES) this trainer minimises."""
        return self._loss_fn

    # ------------------------------------------------------------------ one RL step

    def step(
        self,
        batch: TrainBatch,
        shuffle_seed: int | None = None,
        first_done: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Update on `batch`; returns the mean of each statistic over the mini-batches.

        Keys: loss, pg_loss, clipfrac, approx_kl, ratio_mean, kl (when reference log-probs
        are given), entropy, grad_norm, and for PPO value_loss, vf_clipfrac, vf_mse,
        vpred_mean, critic_grad_norm; plus num_minibatches, num_tokens, skipped_steps,
        update_s.

        `first_done`: the first mini-batch of epoch 0 was already applied (a streaming
        learner accumulates it while groups arrive); these are its statistics.
        """
        started = time.perf_counter()
        algo = self.algo
        if algo.kl_beta > 0 and batch.ref_logprobs is None:
            raise ValueError("kl_beta > 0 needs ref_logprobs in the batch")
        if self._critic is not None and batch.returns is None:
            raise ValueError("ppo needs returns in the batch (see make_train_batch)")
        items = [(p, i) for p, g in enumerate(batch.groups) for i, r in enumerate(g) if r]
        width = batch.max_response_len
        old_logprobs = batch.old_logprobs
        if old_logprobs is None:
            old_logprobs = self._score(batch, items, self.policy_logprobs)
        old_values = batch.old_values
        if self._critic is not None and old_values is None:
            old_values = self._score(batch, items, self.critic_values)

        if shuffle_seed is None:
            shuffle_seed = self.seed * 1_000_003 + self.steps_done
        sums: dict[str, float] = defaultdict(float)
        count = 0
        for epoch in range(algo.ppo_epochs):
            for k, mb in enumerate(minibatches(len(batch.prompts), items, epoch, shuffle_seed,
                                               algo.mini_batch_size)):
                if epoch == 0 and k == 0 and first_done is not None:
                    stats = dict(first_done)
                else:
                    stats = self._policy_update(batch, mb, old_logprobs, width)
                    if self._critic is not None:
                        assert old_values is not None
                        stats.update(self._critic_update(batch, mb, old_values, width))
                for key, value in stats.items():
                    sums[key] += value
                count += 1
        self.steps_done += 1
        out = {key: value / max(count, 1) for key, value in sums.items()}
        out["skipped_steps"] = sums.get("skipped_steps", 0.0)
        out["num_minibatches"] = float(count)
        out["num_tokens"] = float(batch.num_tokens)
        out["update_s"] = time.perf_counter() - started
        return out

    # ------------------------------------------------------------------ forward passes

    def policy_logprobs(self, prompts, groups) -> list[list[Tensor]]:
        return self._policy.run(grouped_logprobs, prompts, groups)

    def critic_values(self, prompts, groups) -> list[list[Tensor]]:
        assert self._critic is not None
        return self._critic.run(_grouped_values, prompts, groups)

    def _score(self, batch: TrainBatch, items: list[Item], fn) -> Ragged:
        """No-grad pass over the batch in mini-batch chunks -> ragged per response."""
        out: Ragged = [[torch.zeros(0) for _ in group] for group in batch.groups]
        size = self.algo.mini_batch_size
        with torch.no_grad(), eval_mode(self.model), eval_mode(self.critic):
            for start in range(0, len(items), size):
                chunk = items[start : start + size]
                prompts, groups = _regroup(batch, chunk)
                flat = [t.detach().float().cpu() for grp in fn(prompts, groups) for t in grp]
                for (p, i), t in zip(chunk, flat, strict=True):
                    out[p][i] = t
        return out

    def logprobs_and_entropy(self, prompts, groups) -> tuple[list[Tensor], list[Tensor]]:
        """Per response (flat, in order): log-probs and exact entropies, one LM-head pass."""
        return self._policy.run(_logprobs_and_entropy, prompts, groups,
                                self.algo.entropy_coef > 0)

    # ------------------------------------------------------------------ updates

    def _policy_update(
        self, batch: TrainBatch, mb: list[Item], old_logprobs: Ragged, width: int
    ) -> dict[str, float]:
        algo = self.algo
        prompts, groups = _regroup(batch, mb)
        logp_rows, ent_rows = self.logprobs_and_entropy(prompts, groups)
        logp = pad_grad(logp_rows, width)
        entropy = pad_grad(ent_rows, width)
        device = logp.device
        mask = _mask(batch, mb, width, device)
        adv = _gather(batch.advantages, mb, width, device)
        old = _gather(old_logprobs, mb, width, device)
        pg_loss, stats = self._loss_fn(logp, old, adv, mask, clip_eps=algo.clip_eps,
                                       agg=algo.loss_agg)
        loss = pg_loss
        if batch.ref_logprobs is not None:
            ref = _gather(batch.ref_logprobs, mb, width, device)
            kl = aggregate(kl_penalty(logp, ref, algo.kl_estimator), mask, algo.loss_agg)
            stats["kl"] = float(kl.detach())
            if algo.kl_beta > 0:
                loss = loss + algo.kl_beta * kl
        ent = aggregate(entropy, mask, algo.loss_agg)
        if algo.entropy_coef > 0:
            loss = loss - algo.entropy_coef * ent
        self._policy.backward(loss)
        grad_norm = self._policy.step()
        stats.update({
            "loss": float(loss.detach()),
            "pg_loss": float(pg_loss.detach()),
            "entropy": float(ent.detach()),
            "grad_norm": grad_norm,
            "skipped_steps": 0.0 if math.isfinite(grad_norm) else 1.0,
            "logprob_mean": float(masked_mean(logp.detach(), mask)),
        })
        return stats

    def _critic_update(
        self, batch: TrainBatch, mb: list[Item], old_values: Ragged, width: int
    ) -> dict[str, float]:
        assert self._critic is not None and batch.returns is not None
        prompts, groups = _regroup(batch, mb)
        rows = [v for grp in self.critic_values(prompts, groups) for v in grp]
        values = pad_grad(rows, width)
        device = values.device
        returns = _gather(batch.returns, mb, width, device)
        old = _gather(old_values, mb, width, device)
        mask = _mask(batch, mb, width, device)
        loss, stats = value_loss(values, old, returns, mask, clip=self.algo.value_clip,
                                 agg=self.algo.loss_agg)
        self._critic.backward(loss)
        stats["critic_grad_norm"] = self._critic.step()
        stats["value_loss"] = float(loss.detach())
        return stats

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state and step count, so a stateless trainer function can resume.

        Plain tensors and numbers only: `torch.save` it and `torch.load(weights_only=True)`.
        """
        return {
            "steps_done": self.steps_done,
            "backend": self._layout(),
            "policy_optimizer": self._policy.state_dict(),
            "critic_optimizer": self._critic.state_dict() if self._critic else None,
        }

    def _layout(self) -> str:
        """'torch' or 'deepspeed-zero<stage>': the optimizer-state layouts differ."""
        stage = getattr(self._policy, "zero_stage", None)
        return self._policy.backend if stage is None else f"{self._policy.backend}-zero{stage}"

    def load_state_dict(self, state: dict[str, Any]) -> None:
        backend = self._layout()
        if state.get("backend", "torch") != backend:
            raise ValueError(
                f"optimizer state is from backend '{state.get('backend')}', this trainer "
                f"uses '{backend}'"
            )
        if (state.get("critic_optimizer") is None) != (self._critic is None):
            raise ValueError("optimizer state and trainer disagree on having a critic")
        self._policy.load_state_dict(state["policy_optimizer"])
        if self._critic is not None:
            self._critic.load_state_dict(state["critic_optimizer"])
        self.steps_done = int(state.get("steps_done", 0))
