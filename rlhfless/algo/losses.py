"""Policy and value losses (pure tensor functions over [B, T] response tokens)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rlhfless.algo.ops import aggregate, masked_mean
from rlhfless.registry import lookup

# exp() of a log-ratio beyond this overflows nothing yet already means "clipped"; the clamp
# keeps a single wild token from producing inf * 0 = NaN in the masked loss.
_LOG_RATIO_LIMIT = 20.0


def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    agg: str = "token-mean",
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate: max(-A r, -A clip(r, 1-eps, 1+eps_high)), aggregated by `agg`.

    `dual_clip` (c > 1, Ye et al. 2020) also bounds the loss of negative-advantage tokens by
    -A c, so a token whose ratio exploded cannot dominate the gradient.
    Stats: clipfrac (share of tokens where the clipped branch is active), approx_kl
    (mean old_logp - logp), dual_clipfrac, ratio_mean.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = (logp - old_logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = (loss_clipped > loss_unclipped).to(logp.dtype)
    dual_frac = torch.zeros((), dtype=logp.dtype)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = ((adv < 0) & (loss > bound)).to(logp.dtype)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
        dual_frac = masked_mean(dual_active, mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(clipped, mask).item(),
            "approx_kl": masked_mean(-log_ratio, mask).item(),
            "dual_clipfrac": float(dual_frac),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return aggregate(loss, mask, agg), stats


def vanilla_pg_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    agg: str = "token-mean",
    **_: Any,
) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE with importance ratio and no clipping (a baseline for comparisons)."""
    log_ratio = (logp - old_logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    loss = -adv * torch.exp(log_ratio)
    with torch.no_grad():
        stats = {"clipfrac": 0.0, "approx_kl": masked_mean(-log_ratio, mask).item(),
                 "dual_clipfrac": 0.0, "ratio_mean": masked_mean(log_ratio.exp(), mask).item()}
    return aggregate(loss, mask, agg), stats


POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, float]]]] = {
    "ppo_clip": ppo_clip_loss,
    "vanilla": vanilla_pg_loss,
}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2), aggregated by `agg`.

    Clipping keeps the critic from moving far from the values the advantages were computed
    with; `clip=None` gives the plain squared error. Stats: vf_clipfrac, vpred_mean and
    vf_mse (the unclipped mean squared error).
    """
    err = (values - returns) ** 2
    if clip is None:
        loss_mat = err
        clipped = torch.zeros_like(err)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        err_clipped = (v_clipped - returns) ** 2
        loss_mat = torch.maximum(err, err_clipped)
        clipped = (err_clipped > err).to(values.dtype)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean(clipped, mask).item(),
            "vpred_mean": masked_mean(values, mask).item(),
            "vf_mse": masked_mean(err, mask).item(),
        }
    return 0.5 * aggregate(loss_mat, mask, agg), stats


def get_policy_loss(name: str) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """The registered policy loss; unknown names raise ValueError listing the known ones."""
    return lookup(POLICY_LOSSES, name, "policy loss")
