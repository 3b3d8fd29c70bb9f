"""The scored batch one policy update consumes, and how the driver builds it.

Layout (the same as the trainer's wire request): everything is grouped per prompt, then per
response; per-token quantities are ragged 1-D float tensors with one entry per response
token (`len(groups[p][i])`). Ragged beats padded here because responses of one step differ
a lot in length and the trainer re-packs them into mini-batches anyway (`pad_ragged`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from rlhfless.algo import gae_advantages, get_advantage_fn, token_level_rewards

Ragged = list[list[Tensor]]  # [prompt][response] -> Tensor[len(response)]
_PER_TOKEN = ("advantages", "ref_logprobs", "old_logprobs", "returns", "old_values")


@dataclass
class TrainBatch:
    """One RL step's data.

    prompts[p]: prompt token ids; groups[p][i]: the i-th response to prompt p.
    advantages: per response token (required). ref_logprobs: reference policy log-probs
    (needed when kl_beta > 0). old_logprobs: behaviour-policy log-probs; None means "compute
    them with the current weights before the first update" (verl's recompute). returns and
    old_values: PPO critic targets and the values the advantages were computed from (old
    values default to a fresh critic pass when None).
    """

    prompts: list[list[int]]
    groups: list[list[list[int]]]
    advantages: Ragged
    ref_logprobs: Ragged | None = None
    old_logprobs: Ragged | None = None
    returns: Ragged | None = None
    old_values: Ragged | None = None

    def __post_init__(self) -> None:
        if len(self.groups) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.groups)} groups")
        if any(len(p) == 0 for p in self.prompts):
            raise ValueError("prompts must not be empty")
        lengths = [[len(r) for r in group] for group in self.groups]
        for name in _PER_TOKEN:
            per_token = getattr(self, name)
            if per_token is None:
                continue
            if len(per_token) != len(self.groups):
                raise ValueError(f"{name} must have one entry per prompt")
            for p, (want, got) in enumerate(zip(lengths, per_token, strict=True)):
                if want != [int(t.numel()) for t in got]:
                    raise ValueError(f"{name}[{p}] must match the response lengths {want}")

    @classmethod
    def from_lists(cls, **kwargs: Any) -> TrainBatch:
        """Build from nested float lists (the JSON wire form); tensors pass through."""
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown TrainBatch fields: {', '.join(sorted(unknown))}")
        for name in _PER_TOKEN:
            if kwargs.get(name) is not None:
                kwargs[name] = [
                    [torch.as_tensor(v, dtype=torch.float32) for v in group]
                    for group in kwargs[name]
                ]
        return cls(**kwargs)

    def to_lists(self) -> dict[str, Any]:
        """The inverse of from_lists (plain Python numbers, JSON-serialisable)."""
        out: dict[str, Any] = {"prompts": self.prompts, "groups": self.groups}
        for name in _PER_TOKEN:
            value = getattr(self, name)
            out[name] = None if value is None else [[t.tolist() for t in g] for g in value]
        return out

    @property
    def num_responses(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for g in self.groups for r in g)

    @property
    def max_response_len(self) -> int:
        return max((len(r) for g in self.groups for r in g), default=0)


def pad_ragged(
    rows: Sequence[Tensor], length: int | None = None, pad_value: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Stack 1-D tensors into [B, T] plus a float mask (1 = real token)."""
    width = max((int(r.numel()) for r in rows), default=0) if length is None else length
    dtype = rows[0].dtype if rows else torch.float32
    out = torch.full((len(rows), width), pad_value, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        n = int(row.numel())
        if n > width:
            raise ValueError(f"row {i} has {n} tokens, more than the width {width}")
        out[i, :n] = row
        mask[i, :n] = 1.0
    return out, mask


def _unpad(mat: Tensor, lengths: list[list[int]]) -> Ragged:
    out, row = [], 0
    for group in lengths:
        out.append([mat[row + i, :n].clone() for i, n in enumerate(group)])
        row += len(group)
    return out


def group_advantages(
    rewards: Sequence[Sequence[float]],
    groups: Sequence[Sequence[Sequence[int]]],
    estimator: str = "grpo",
) -> Ragged:
    """Per-response group advantages ("grpo" | "drgrpo"), broadcast over each response."""
    flat = torch.tensor([float(r) for rs in rewards for r in rs], dtype=torch.float32)
    index = torch.tensor([p for p, rs in enumerate(rewards) for _ in rs], dtype=torch.long)
    if [len(r) for r in rewards] != [len(g) for g in groups]:
        raise ValueError("rewards must have one value per response")
    adv = get_advantage_fn(estimator)(flat, index)
    out, k = [], 0
    for group in groups:
        out.append([torch.full((len(resp),), float(adv[k + i])) for i, resp in enumerate(group)])
        k += len(group)
    return out


def gae_from_rewards(
    rewards: Sequence[Sequence[float]],
    values: Ragged,
    groups: Sequence[Sequence[Sequence[int]]],
    gamma: float,
    lam: float,
    whiten: bool = True,
) -> tuple[Ragged, Ragged]:
    """GAE with the scalar reward on each response's last token: (advantages, returns)."""
    lengths = [[len(r) for r in g] for g in groups]
    v, mask = pad_ragged([t.float() for g in values for t in g])
    seq = torch.tensor([float(r) for rs in rewards for r in rs], dtype=torch.float32)
    adv, ret = gae_advantages(token_level_rewards(seq, mask), v, mask, gamma, lam, whiten=whiten)
    return _unpad(adv, lengths), _unpad(ret, lengths)


def make_train_batch(
    algo: Any,
    prompts: list[list[int]],
    groups: list[list[list[int]]],
    rewards: Sequence[Sequence[float]],
    ref_logprobs: Ragged | None = None,
    old_logprobs: Ragged | None = None,
    values: Ragged | None = None,
    whiten_gae: bool = True,
) -> TrainBatch:
    """Scored rollouts -> TrainBatch with the advantages `algo.advantage` asks for.

    `rewards[p][i]` is the scalar reward of groups[p][i]. PPO ("gae") needs the critic's
    `values` per response token; they become the batch's old_values.
    """
    if algo.advantage == "gae":
        if values is None:
            raise ValueError("advantage 'gae' needs the critic's values")
        adv, returns = gae_from_rewards(rewards, values, groups, algo.gamma, algo.lam,
                                        whiten=whiten_gae)
        return TrainBatch(prompts, groups, adv, ref_logprobs, old_logprobs, returns, values)
    adv = group_advantages(rewards, groups, algo.advantage)
    return TrainBatch(prompts, groups, adv, ref_logprobs, old_logprobs)
