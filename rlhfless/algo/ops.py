"""Masked reductions shared by advantages and losses.

A mask is a float or bool tensor with the shape of the values: 1 marks a real response token,
0 marks padding (or a prompt/observation token). Every reduction here is finite even when the
mask is all zeros, because an empty mini-batch row must never turn a loss into NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rlhfless.registry import lookup


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is 1."""
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over masked positions; 0 where there are none (never NaN)."""
    m = mask.to(x.dtype)
    total = masked_sum(x, m, dim)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return total / count.clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over all masked positions (Bessel-corrected when `unbiased` and n > 1)."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    sq = masked_sum((x - mean) ** 2, m)
    n = m.sum()
    denom = (n - 1.0) if unbiased else n
    return sq / denom.clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over masked positions; masked-out positions come back as 0."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps) if shift_mean else x * torch.rsqrt(var + eps)
    return out * m


def _token_mean(loss: Tensor, mask: Tensor) -> Tensor:
    # Every real token in the batch weighs the same: long responses dominate.
    return masked_mean(loss, mask)


def _seq_mean_token_mean(loss: Tensor, mask: Tensor) -> Tensor:
    # Every sequence weighs the same (original GRPO); empty rows are left out of the mean.
    m = mask.to(loss.dtype)
    per_seq = masked_mean(loss, m, dim=-1)
    has_tokens = (m.sum(dim=-1) > 0).to(loss.dtype)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


def _seq_mean_token_sum(loss: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(loss.dtype)
    per_seq = masked_sum(loss, m, dim=-1)
    has_tokens = (m.sum(dim=-1) > 0).to(loss.dtype)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


def _seq_mean_token_sum_norm(loss: Tensor, mask: Tensor) -> Tensor:
    # Dr. GRPO: divide the token sum by a constant (the padded length T) instead of each
    # response's own length, which removes GRPO's bias towards long wrong answers.
    m = mask.to(loss.dtype)
    batch, length = loss.shape[0], loss.shape[-1]
    return masked_sum(loss, m) / float(max(batch * length, 1))


def _token_sum(loss: Tensor, mask: Tensor) -> Tensor:
    # Not a user choice: the un-normalised numerator a streaming learner accumulates
    # (`mask` then carries each token's weight, see `aggregation_weight`).
    return masked_sum(loss, mask)


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean": _seq_mean_token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
    "token-sum": _token_sum,
}


def aggregate(loss_mat: Tensor, mask: Tensor, agg: str = "token-mean") -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar with the named aggregation."""
    return lookup(AGGREGATIONS, agg, "loss aggregation")(loss_mat, mask)


# ---- aggregation as a weighted sum over a batch's totals (streaming accumulation) ----------
# Every aggregation above is linear in the per-token losses: Σ_i Σ_t w(len_i) · loss_it / D,
# where the weight depends only on the response's own length and D only on batch totals.
# A learner that receives groups one by one accumulates the weighted sums (and their
# gradients) and divides by D once the batch is complete: exactly the whole-batch value.


def aggregation_weight(length: int, agg: str) -> float:
    """Weight of each token of a response of `length` tokens under `agg`."""
    lookup(AGGREGATIONS, agg, "loss aggregation")
    if length <= 0:
        return 0.0
    return 1.0 / length if agg in ("seq-mean", "seq-mean-token-mean") else 1.0


def aggregation_denominator(lengths: list[int], agg: str, width: int) -> float:
    """D of a mini-batch with these response lengths; `width` is the padded length the
    whole-batch computation uses (the longest response of the batch)."""
    lookup(AGGREGATIONS, agg, "loss aggregation")
    if agg == "token-mean":
        return float(max(sum(lengths), 1))
    if agg == "seq-mean-token-sum-norm":
        return float(max(len(lengths) * width, 1))
    if agg == "token-sum":
        return 1.0
    return float(max(sum(1 for n in lengths if n > 0), 1))
