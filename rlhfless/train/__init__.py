"""The policy (and critic) update: TrainBatch in, updated weights and statistics out."""

from rlhfless.train.batch import (
    TrainBatch,
    gae_from_rewards,
    group_advantages,
    make_train_batch,
    pad_ragged,
)
from rlhfless.train.optim import DeepSpeedAdamW, TorchAdamW, make_optimizer
from rlhfless.train.update import PolicyTrainer

__all__ = [
    "DeepSpeedAdamW",
    "PolicyTrainer",
    "TorchAdamW",
    "TrainBatch",
    "gae_from_rewards",
    "group_advantages",
    "make_optimizer",
    "make_train_batch",
    "pad_ragged",
]
