"""Entropy of the next-token distribution, from logits."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhfless.algo.ops import masked_mean


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = logsumexp(z) - sum softmax(z) z over the last (vocab) axis; shape drops it.

    Tokens with zero probability (logit -inf, e.g. a banned token) contribute 0, not NaN.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    weighted = torch.where(probs > 0, probs * logits, torch.zeros_like(probs))
    return torch.logsumexp(logits, dim=-1) - weighted.sum(dim=-1)


def masked_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy over masked-in positions of [B, T, V] logits (0 if none)."""
    return masked_mean(entropy_from_logits(logits), mask)


def sampled_entropy(logp: Tensor, mask: Tensor) -> Tensor:
    """Monte-Carlo entropy estimate -E[log p(x)] from on-policy sampled tokens' log-probs.

    Good for monitoring when logits are not at hand; its gradient is zero in expectation, so
    it cannot serve as an entropy bonus.
    """
    return masked_mean(-logp, mask)
