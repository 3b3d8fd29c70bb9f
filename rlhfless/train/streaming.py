"""The streaming update: one RL step's groups arrive one by one, one optimizer step at the end.

    learner.begin(step, group_ids, shuffle_seed)      # zero gradients, plan the mini-batches
    learner.add_group(group) × len(group_ids)         # any order; a repeated id counts once
    learner.finish() -> stats                          # one optimizer step (first mini-batch)

Per group, at once: reference log-probs (shared-prefix forward of the frozen reference),
critic values (PPO), the group's advantages (GRPO: within the group; PPO: GAE per response)
and the policy's (and critic's) gradient contribution, accumulated into the parameters'
gradients. Nothing of a group waits for the others.

Exactness. The first pass is exactly on-policy: the behaviour log-probs are the learner's
own forward on the same weights, so the ratio is 1 and every registered surrogate reduces to
-A·r, whose gradient is -A∇log p (clipping inactive). Every loss aggregation is linear in the
per-token losses with a per-response weight and one batch-level denominator
(`rlhfless.algo.ops.aggregation_denominator`): the learner accumulates un-normalised sums
and scales the accumulated gradient by 1/D at `finish`, before the global-norm clip.
PPO whitens GAE advantages over the whole batch, A' = (A − μ)/σ with μ, σ known only at the
end; at ratio 1 the gradient is linear in A, so the learner accumulates Σ w A ∇log p and
Σ w ∇log p separately (two backward passes per group) and combines them as
(1/σ)·first − (μ/σ)·second at `finish`. The result equals the whole-batch update up to float
summation order, whatever order the groups arrived in.

Several mini-batches or `ppoEpochs > 1`: only the first optimizer step can stream (the
others need the weights after it). The mini-batches are planned at `begin` from the step's
seed; the first mini-batch's responses stream as above, every other response gets its
forward-only work (behaviour and reference log-probs, values, advantages) at `add`, and the
remaining mini-batches and epochs run after the first step in `finish`, as the whole-batch
trainer runs them. An optimizer whose gradients are not reachable (DeepSpeed ZeRO-2 keeps
them partitioned) gets only the forward-only work streamed; its whole update runs in
`finish`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from rlhfless.algo import aggregate, gae_advantages, kl_penalty, token_level_rewards, value_loss
from rlhfless.algo.ops import aggregation_denominator, aggregation_weight
from rlhfless.model.logprobs import grouped_logprobs
from rlhfless.train.batch import TrainBatch, group_advantages, pad_ragged
from rlhfless.train.sharding import ShardedModule, run_on
from rlhfless.train.update import PolicyTrainer, eval_mode, minibatches, pad_grad

WHITEN_EPS = 1e-8  # as rlhfless.algo.ops.masked_whiten


def _module(model: Any) -> torch.nn.Module:
    """The nn.Module behind a (possibly sharded) model."""
    return model.module if isinstance(model, ShardedModule) else model


class LearnerStateError(RuntimeError):
    """A request that does not fit the learner's open step; `code` says which kind."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


@dataclass
class GroupInput:
    """One group: a prompt, its responses (non-empty token lists) and one reward each."""

    group_id: str
    prompt: list[int]
    responses: list[list[int]]
    rewards: list[float]


@dataclass
class _Group:
    data: GroupInput
    advantages: list[Tensor]  # PPO: raw GAE (whitened in finish)
    old_logprobs: list[Tensor]
    ref_logprobs: list[Tensor] | None = None
    values: list[Tensor] | None = None
    returns: list[Tensor] | None = None
    mine: set[int] = field(default_factory=set)  # responses whose rows this rank computed


@dataclass
class _Sums:
    """Un-normalised sums of the streamed first mini-batch (float64 accumulators)."""

    pg_adv: float = 0.0  # Σ w·(−A·r)
    pg_one: float = 0.0  # Σ w·(−r), PPO whitening only
    kl: float = 0.0
    entropy: float = 0.0
    logp: float = 0.0
    tokens: int = 0
    value_loss: float = 0.0
    vf_err: float = 0.0
    vpred: float = 0.0

    def reduce(self, sum_over_ranks: Any) -> None:
        """Every rank's sums added up (one collective)."""
        names = [f.name for f in fields(self)]
        totals = sum_over_ranks([float(getattr(self, n)) for n in names])
        for name, value in zip(names, totals, strict=True):
            setattr(self, name, int(round(value)) if name == "tokens" else value)


class StreamingLearner:
    """begin / add_group / finish over a PolicyTrainer (which owns the optimizers).

    `reference` is the frozen reference policy (needed when kl_beta > 0); the critic, for
    PPO, is the trainer's. `group_size` is the number of responses every group brings.
    """

    def __init__(self, trainer: PolicyTrainer, algo: Any, group_size: int,
                 reference: torch.nn.Module | None = None) -> None:
        if algo.kl_beta > 0 and reference is None:
            raise ValueError("kl_beta > 0 needs the reference policy")
        self.trainer = trainer
        self.algo = algo
        self.group_size = group_size
        self.reference = reference
        self.whiten = algo.advantage == "gae"
        opts = [trainer.policy_optimizer, trainer.critic_optimizer]
        self.streams_gradients = all(o is None or o.grad_access for o in opts)
        self.step: int | None = None
        self.finished: dict[int, dict[str, float]] = {}
        self._reset()

    # ------------------------------------------------------------------ protocol

    def begin(self, step: int, group_ids: Sequence[str], shuffle_seed: int) -> None:
        """Open `step` (dropping whatever an earlier step left unfinished)."""
        if len(set(group_ids)) != len(group_ids) or not group_ids:
            raise ValueError("group_ids must be distinct and non-empty")
        self._reset()
        self.step = step
        self.group_ids = list(group_ids)
        self.position = {g: p for p, g in enumerate(self.group_ids)}
        self.shuffle_seed = shuffle_seed
        items = [(p, i) for p in range(len(group_ids)) for i in range(self.group_size)]
        plan = minibatches(len(group_ids), items, 0, shuffle_seed, self.algo.mini_batch_size)
        self.single_pass = len(plan) == 1 and self.algo.ppo_epochs == 1
        self.first: set[tuple[int, int]] = set(plan[0]) if self.streams_gradients else set()

    def add_group(self, group: GroupInput) -> bool:
        """Take one group (False: it was already in: counted once)."""
        self._check_open()
        if group.group_id not in self.position:
            raise LearnerStateError("unknown_group", f"group {group.group_id!r} is not part "
                                    f"of step {self.step}")
        if group.group_id in self.groups:
            return False
        if len(group.responses) != self.group_size or len(group.rewards) != self.group_size:
            raise ValueError(f"group {group.group_id!r} has {len(group.responses)} responses "
                             f"and {len(group.rewards)} rewards; the job's groups have "
                             f"{self.group_size}")
        if any(len(r) == 0 for r in group.responses):
            raise ValueError(f"group {group.group_id!r} has an empty response")
        started = time.perf_counter()
        p = self.position[group.group_id]
        streamed = [i for i in range(self.group_size) if (p, i) in self.first]
        self.groups[group.group_id] = self._forward(group, streamed)
        self.timings["add_s"] += time.perf_counter() - started
        return True

    def missing(self) -> list[str]:
        return [g for g in self.group_ids if g not in self.groups] if self.step else []

    def finish(self) -> dict[str, float]:
        """The step's optimizer step(s); refused unless every group is in."""
        self._check_open()
        missing = self.missing()
        if missing:
            shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
            raise LearnerStateError(
                "groups_missing", f"finish refused: {len(missing)} of {len(self.group_ids)} "
                f"groups of step {self.step} not added ({shown})")
        started = time.perf_counter()
        self.sums.reduce(self._sum_over_ranks)
        if self.whiten:
            total, squares, n = self._sum_over_ranks([float(x) for x in self.adv_stats])
            self.adv_stats = [total, squares, int(round(n))]
        mu, inv_sigma = self._whitening()
        first_stats = self._apply_first(mu, inv_sigma) if self.first else None
        if first_stats is not None and self.single_pass:
            stats = dict(first_stats)
            self.trainer.steps_done += 1
            stats.update(num_minibatches=1.0, num_tokens=float(self._tokens()))
        else:
            self._complete()
            stats = self.trainer.step(self._batch(mu, inv_sigma), self.shuffle_seed,
                                      first_done=first_stats)
        stats["update_s"] = time.perf_counter() - started
        stats.update({k: float(v) for k, v in self.timings.items()})
        stats["streamed_responses"] = float(len(self.first))
        self.finished[int(self.step or 0)] = stats
        for old in sorted(self.finished)[:-4]:  # a repeated finish asks for a recent step
            del self.finished[old]
        self.step = None
        return stats

    # ------------------------------------------------------------------ internals

    def _reset(self) -> None:
        self.groups: dict[str, _Group] = {}
        self.group_ids: list[str] = []
        self.position: dict[str, int] = {}
        self.first = set()
        self.sums = _Sums()
        self.adv_stats = [0.0, 0.0, 0]  # Σ A, Σ A², tokens (PPO whitening, whole batch)
        self.timings: dict[str, float] = {"add_s": 0.0, "ref_s": 0.0}
        self._buffers: dict[str, list[Tensor]] = {}
        for opt in (self.trainer.policy_optimizer, self.trainer.critic_optimizer):
            if opt is not None:
                opt.zero_grad()

    def _check_open(self) -> None:
        if self.step is None:
            raise LearnerStateError("step_not_open", "no step is open on this learner "
                                    "(it restarted, or the step already finished): begin it")

    # ------------------------------------------------------------------ rank hooks
    # One rank: everything is its own. DistributedStreamingLearner (rlhfless.train.
    # distributed) splits each group's responses over the ranks and sums at `finish`.

    def _share(self, indices: list[int]) -> tuple[list[int], bool]:
        """This rank's part of `indices` (one kind of a group's responses), and whether it is
        a zero-weighted stand-in (a rank with no share still makes the same calls)."""
        return list(indices), False

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        return values

    def _complete(self) -> None:
        """Make every response's forward-only results (split over ranks) known here."""

    # ------------------------------------------------------------------ one group

    def _forward(self, group: GroupInput, streamed_all: list[int]) -> _Group:
        t = self.trainer
        prompt, responses = group.prompt, group.responses
        n = len(responses)
        first = set(streamed_all)
        streamed, streamed_stand_in = self._share(streamed_all)
        rest, rest_stand_in = self._share([i for i in range(n) if i not in first])
        mine = sorted((set() if streamed_stand_in else set(streamed))
                      | (set() if rest_stand_in else set(rest)))
        stand_ins = ([streamed[0]] if streamed_stand_in else []) \
            + ([rest[0]] if rest_stand_in else [])

        def pick(indices: list[int]) -> list[list[int]]:
            return [responses[i] for i in indices]

        def empty() -> list[Tensor]:
            return [torch.zeros(0)] * n

        ref = None
        if self.reference is not None:
            started = time.perf_counter()
            with torch.no_grad(), eval_mode(_module(self.reference)):
                rows = run_on(self.reference, grouped_logprobs, [prompt],
                              [pick(mine + stand_ins)])[0]
            ref = empty()
            for i, lp in zip(mine, rows, strict=False):
                ref[i] = lp.float().cpu()
            self.timings["ref_s"] += time.perf_counter() - started

        values = None
        values_grad: list[Tensor] = []
        if t.critic is not None:
            values = empty()
            if streamed:
                values_grad = t.critic_values([prompt], [pick(streamed)])[0]
                if not streamed_stand_in:
                    for i, v in zip(streamed, values_grad, strict=True):
                        values[i] = v.detach().float().cpu()
            if rest:
                with torch.no_grad(), eval_mode(t.critic):
                    vals = t.critic_values([prompt], [pick(rest)])[0]
                if not rest_stand_in:
                    for i, v in zip(rest, vals, strict=True):
                        values[i] = v.float().cpu()

        advantages, returns = self._advantages(group, values, mine)
        old = empty()
        if rest:
            with torch.no_grad(), eval_mode(t.model):
                lps = t.policy_logprobs([prompt], [pick(rest)])[0]
            if not rest_stand_in:
                for i, lp in zip(rest, lps, strict=True):
                    old[i] = lp.float().cpu()
        if streamed:
            def known(rows: list[Tensor] | None, i: int) -> Tensor:
                # A stand-in's row is not this rank's: zeros of its length (weight 0 anyway).
                return torch.zeros(len(responses[i])) if streamed_stand_in else rows[i]

            old_streamed = self._stream_policy(
                prompt, pick(streamed), [known(advantages, i) for i in streamed],
                [known(ref, i) for i in streamed] if ref else None, streamed_stand_in)
            if not streamed_stand_in:
                for i, lp in zip(streamed, old_streamed, strict=True):
                    old[i] = lp
            if values_grad:
                assert returns is not None
                self._stream_critic(values_grad, [known(returns, i) for i in streamed],
                                    streamed_stand_in)
        return _Group(group, advantages, old, ref, values, returns, set(mine))

    def _advantages(self, group: GroupInput, values: list[Tensor] | None,
                    mine: list[int]) -> tuple[list[Tensor], list[Tensor] | None]:
        """Advantages (and PPO returns) of the responses in `mine` (GRPO: of all, from the
        group's rewards)."""
        if not self.whiten:
            return group_advantages([group.rewards], [group.responses],
                                    self.algo.advantage)[0], None
        assert values is not None
        n = len(group.responses)
        advantages, returns = [torch.zeros(0)] * n, [torch.zeros(0)] * n
        if not mine:
            return advantages, returns
        v, mask = pad_ragged([values[i] for i in mine])
        seq = torch.tensor([float(group.rewards[i]) for i in mine], dtype=torch.float32)
        adv, ret = gae_advantages(token_level_rewards(seq, mask), v, mask, self.algo.gamma,
                                  self.algo.lam, whiten=False)
        for k, i in enumerate(mine):
            length = len(group.responses[i])
            advantages[i] = adv[k, :length].clone()
            returns[i] = ret[k, :length].clone()
        a = torch.cat([advantages[i] for i in mine]).double()
        self.adv_stats[0] += float(a.sum())
        self.adv_stats[1] += float((a * a).sum())
        self.adv_stats[2] += int(a.numel())
        return advantages, returns

    def _weights(self, lengths: list[int], width: int, device: torch.device) -> Tensor:
        rows = [torch.full((n,), aggregation_weight(n, self.algo.loss_agg)) for n in lengths]
        return pad_ragged(rows, width)[0].to(device)

    def _stream_policy(self, prompt: list[int], responses: list[list[int]],
                       advantages: list[Tensor], ref: list[Tensor] | None,
                       stand_in: bool = False) -> list[Tensor]:
        """Accumulate the streamed responses' policy gradient; returns their log-probs.
        A stand-in makes the same calls with weight 0 and counts nothing."""
        t, algo = self.trainer, self.algo
        sums = _Sums() if stand_in else self.sums
        lengths = [len(r) for r in responses]
        width = max(lengths)
        logp_rows, ent_rows = t.logprobs_and_entropy([prompt], [responses])
        logp, entropy = pad_grad(logp_rows, width), pad_grad(ent_rows, width)
        device = logp.device
        weights = self._weights(lengths, width, device) * (0.0 if stand_in else 1.0)
        old = logp.detach()  # exactly on-policy: ratio ≡ 1
        adv = pad_ragged([a.float() for a in advantages], width)[0].to(device)
        kwargs = {"clip_eps": algo.clip_eps, "agg": "token-sum"}
        pg_adv, _ = t.policy_loss(logp, old, adv, weights, **kwargs)
        other = torch.zeros((), device=device)
        if ref is not None:
            ref_mat = pad_ragged(ref, width)[0].to(device)
            kl = aggregate(kl_penalty(logp, ref_mat, algo.kl_estimator), weights, "token-sum")
            sums.kl += float(kl.detach())
            other = other + algo.kl_beta * kl
        ent = aggregate(entropy, weights, "token-sum")
        sums.entropy += float(ent.detach())
        if algo.entropy_coef > 0:
            other = other - algo.entropy_coef * ent
        opt = t.policy_optimizer
        if self.whiten:
            pg_one, _ = t.policy_loss(logp, old, torch.ones_like(adv), weights, **kwargs)
            self._accumulate("policy_adv", pg_adv, opt, retain=True)
            self._accumulate("policy_one", pg_one, opt, retain=other.requires_grad)
            sums.pg_one += float(pg_one.detach())
            if other.requires_grad:
                opt.backward(other)
        else:
            opt.backward(pg_adv + other)
        sums.pg_adv += float(pg_adv.detach())
        mask = pad_ragged([torch.ones(n) for n in lengths], width)[0].to(device)
        sums.logp += float((logp.detach() * mask).sum())
        sums.tokens += sum(lengths)
        return [row.detach().float().cpu() for row in logp_rows]

    def _stream_critic(self, values: list[Tensor], returns: list[Tensor],
                       stand_in: bool = False) -> None:
        t = self.trainer
        sums = _Sums() if stand_in else self.sums
        lengths = [int(v.numel()) for v in values]
        width = max(lengths)
        vals = pad_grad(values, width)
        device = vals.device
        weights = self._weights(lengths, width, device) * (0.0 if stand_in else 1.0)
        ret = pad_ragged([r.float() for r in returns], width)[0].to(device)
        loss, _ = value_loss(vals, vals.detach(), ret, weights, clip=self.algo.value_clip,
                             agg="token-sum")
        t.critic_optimizer.backward(loss)
        mask = pad_ragged([torch.ones(n) for n in lengths], width)[0].to(device)
        sums.value_loss += float(loss.detach())
        sums.vf_err += float((((vals.detach() - ret) ** 2) * mask).sum())
        sums.vpred += float((vals.detach() * mask).sum())

    def _accumulate(self, name: str, loss: Tensor, opt: Any, retain: bool) -> None:
        grads = opt.gradient(loss, retain)
        buffers = self._buffers.setdefault(name, [torch.zeros_like(p) for p in opt.params])
        for buf, g in zip(buffers, grads, strict=True):
            if g is not None:
                buf.add_(g)

    def _whitening(self) -> tuple[float, float]:
        """(μ, 1/σ) of the whole batch's raw GAE advantages, as masked_whiten computes them."""
        if not self.whiten:
            return 0.0, 1.0
        total, squares, n = self.adv_stats
        mean = total / max(n, 1)
        var = max(squares - n * mean * mean, 0.0) / max(n - 1, 1)
        return mean, 1.0 / math.sqrt(var + WHITEN_EPS)

    def _width(self) -> int:
        return max(len(r) for g in self.groups.values() for r in g.data.responses)

    def _tokens(self) -> int:
        return sum(len(r) for g in self.groups.values() for r in g.data.responses)

    def _apply_first(self, mu: float, inv_sigma: float) -> dict[str, float]:
        """Normalise the accumulated first mini-batch gradient and take its optimizer step."""
        t, algo, sums = self.trainer, self.algo, self.sums
        lengths = [len(self.groups[self.group_ids[p]].data.responses[i]) for p, i in self.first]
        denom = aggregation_denominator(lengths, algo.loss_agg, self._width())
        opt = t.policy_optimizer
        pg = sums.pg_adv
        if self.whiten:
            adv_buf, one_buf = self._buffers["policy_adv"], self._buffers["policy_one"]
            for p, a, o in zip(opt.params, adv_buf, one_buf, strict=True):
                combined = a * inv_sigma - o * (mu * inv_sigma)
                p.grad = combined if p.grad is None else p.grad + combined
            pg = inv_sigma * sums.pg_adv - mu * inv_sigma * sums.pg_one
        opt.scale_grads(1.0 / denom)
        grad_norm = opt.step()
        loss = pg + algo.entropy_coef * -sums.entropy
        stats = {
            "pg_loss": pg / denom, "clipfrac": 0.0, "approx_kl": 0.0, "dual_clipfrac": 0.0,
            "ratio_mean": 1.0, "entropy": sums.entropy / denom, "grad_norm": grad_norm,
            "skipped_steps": 0.0 if math.isfinite(grad_norm) else 1.0,
            "logprob_mean": sums.logp / max(sums.tokens, 1),
        }
        if self.reference is not None:
            stats["kl"] = sums.kl / denom
            loss += algo.kl_beta * sums.kl
        stats["loss"] = loss / denom
        if t.critic_optimizer is not None:
            t.critic_optimizer.scale_grads(1.0 / denom)
            stats.update({
                "critic_grad_norm": t.critic_optimizer.step(),
                "value_loss": sums.value_loss / denom, "vf_clipfrac": 0.0,
                "vf_mse": sums.vf_err / max(sums.tokens, 1),
                "vpred_mean": sums.vpred / max(sums.tokens, 1),
            })
        return stats

    def _batch(self, mu: float, inv_sigma: float) -> TrainBatch:
        """The whole step as the whole-batch trainer takes it (advantages whitened)."""
        groups = [self.groups[g] for g in self.group_ids]

        def whitened(adv: list[Tensor]) -> list[Tensor]:
            return [(a - mu) * inv_sigma for a in adv] if self.whiten else adv

        return TrainBatch(
            prompts=[g.data.prompt for g in groups],
            groups=[g.data.responses for g in groups],
            advantages=[whitened(g.advantages) for g in groups],
            ref_logprobs=[g.ref_logprobs for g in groups] if self.reference is not None
            else None,
            old_logprobs=[g.old_logprobs for g in groups],
            returns=[g.returns for g in groups] if self.whiten else None,
            old_values=[g.values for g in groups] if self.whiten else None,
        )
