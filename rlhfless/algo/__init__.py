"""RL math as pure tensor functions in registries keyed by name (advantages, losses, KL)."""

from rlhfless.algo.advantages import (
    ADVANTAGES,
    drgrpo_advantages,
    gae_advantages,
    get_advantage_fn,
    grpo_advantages,
    token_level_rewards,
)
from rlhfless.algo.entropy import entropy_from_logits, masked_entropy, sampled_entropy
from rlhfless.algo.kl import KL_ESTIMATORS, kl_penalty
from rlhfless.algo.losses import POLICY_LOSSES, get_policy_loss, ppo_clip_loss, value_loss
from rlhfless.algo.ops import (
    AGGREGATIONS,
    aggregate,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "aggregate",
    "drgrpo_advantages",
    "entropy_from_logits",
    "gae_advantages",
    "get_advantage_fn",
    "get_policy_loss",
    "grpo_advantages",
    "kl_penalty",
    "masked_entropy",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_clip_loss",
    "sampled_entropy",
    "token_level_rewards",
    "value_loss",
]
