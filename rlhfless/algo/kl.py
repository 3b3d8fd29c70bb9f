"""Per-token KL(policy || reference) estimators from sampled-token log-probs (Schulman 2020).

With x sampled from the policy, r = p_ref(x) / p(x):
  k1 = log p - log p_ref           (unbiased, high variance, can be negative)
  k2 = 0.5 (log p - log p_ref)^2   (biased, low variance)
  k3 = r - log r - 1               (unbiased, low variance, always >= 0)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rlhfless.registry import lookup

# Bounds that keep exp() finite and one outlier token from swamping the penalty (as verl).
_LOG_RATIO_LIMIT = 20.0
_K3_LIMIT = 10.0


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    log_r = (ref_logp - logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    return (torch.exp(log_r) - log_r - 1.0).clamp(-_K3_LIMIT, _K3_LIMIT)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL estimate by name; unknown names raise ValueError listing the known ones."""
    return lookup(KL_ESTIMATORS, estimator, "KL estimator")(logp, ref_logp)
