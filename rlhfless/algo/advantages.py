"""Advantage estimators, registered by name (the `advantage` field of AlgorithmSpec).

Group estimators ("grpo", "drgrpo") map one scalar reward per response to one advantage per
response; the caller broadcasts it over the response's tokens. "gae" works per token with a
critic's values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rlhfless.algo.ops import masked_whiten
from rlhfless.registry import lookup


def _group_stats(rewards: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-response (group mean, group unbiased std, group size) of the float rewards."""
    _, inverse = torch.unique(group_index, return_inverse=True)
    n_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    r = rewards.to(torch.float64)  # float64 so equal rewards give (near) zero spread

    def per_group(x: Tensor) -> Tensor:
        return torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inverse, x)

    count = per_group(torch.ones_like(r))
    mean = per_group(r) / count
    sq = per_group((r - mean[inverse]) ** 2)
    # Bessel-corrected like torch.std (verl, TRL); a single-sample group has no spread.
    std = torch.sqrt(sq / (count - 1.0).clamp(min=1.0))
    return mean[inverse], std[inverse], count[inverse]


def grpo_advantages(rewards: Tensor, group_index: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO: (r - mean_group) / (std_group + eps).

    All-equal rewards in a group give 0 (nothing to learn from that prompt; eps keeps it
    finite), and a single-sample group gives 0 too (it has no baseline to compare against).
    """
    mean, std, _ = _group_stats(rewards, group_index)
    adv = (rewards.to(torch.float64) - mean) / (std + eps)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def drgrpo_advantages(rewards: Tensor, group_index: Tensor, eps: float = 1e-6) -> Tensor:
    """Dr. GRPO: r - mean_group, without the std division (removes difficulty bias).

    `eps` is accepted for a uniform registry signature and unused.
    """
    mean, _, _ = _group_stats(rewards, group_index)
    adv = rewards.to(torch.float64) - mean
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def gae_advantages(
    rewards_tok: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over [B, T] response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};
    returns R_t = A_t + V_t (the critic's regression target). The episode ends after the
    last masked-in token (V = 0 beyond it). Masked-out positions are skipped: the next value
    and running advantage are carried over them, and they come back as 0. With `whiten`,
    the advantages (not the returns) are normalised over masked positions, as PPO usually
    does.
    """
    m = mask.to(values.dtype)
    batch, length = values.shape
    next_value = torch.zeros(batch, dtype=values.dtype, device=values.device)
    last_gae = torch.zeros_like(next_value)
    adv = torch.zeros_like(values)
    for t in reversed(range(length)):
        delta = rewards_tok[:, t] + gamma * next_value - values[:, t]
        gae_t = delta + gamma * lam * last_gae
        keep = m[:, t]
        last_gae = keep * gae_t + (1.0 - keep) * last_gae
        next_value = keep * values[:, t] + (1.0 - keep) * next_value
        adv[:, t] = keep * gae_t
    returns = (adv + values) * m
    if whiten:
        adv = masked_whiten(adv, m)
    return adv.detach(), returns.detach()


def token_level_rewards(seq_rewards: Tensor, mask: Tensor) -> Tensor:
    """Place each response's scalar reward on its last real token ([B] -> [B, T])."""
    m = mask.to(torch.float32)
    length = m.shape[-1]
    positions = torch.arange(length, device=m.device).expand_as(m)
    last = torch.where(m > 0, positions, torch.full_like(positions, -1)).max(dim=-1).values
    out = torch.zeros_like(m, dtype=seq_rewards.dtype if seq_rewards.is_floating_point()
                           else torch.float32)
    has = last >= 0
    out[has.nonzero(as_tuple=True)[0], last[has]] = seq_rewards[has].to(out.dtype)
    return out


ADVANTAGES: dict[str, Callable[..., Any]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "gae": gae_advantages,
}


def get_advantage_fn(name: str) -> Callable[..., Any]:
    """The registered estimator; unknown names raise ValueError listing the known ones."""
    return lookup(ADVANTAGES, name, "advantage estimator")
