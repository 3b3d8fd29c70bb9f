"""The reward function: rule-based rewards on decoded text (no weights, no GPU)."""

from __future__ import annotations

import time

from rlhfless.api.spec import RewardSpec
from rlhfless.api.wire import RewardRequest, RewardResponse
from rlhfless.rewards import compute_rewards


class RewardHandler:
    stage = "reward"

    def __init__(self, spec: RewardSpec):
        self.spec = spec

    def loaded_version(self) -> int | None:
        return None

    def handle(self, request: RewardRequest) -> RewardResponse:
        started = time.perf_counter()
        rewards = compute_rewards(
            self.spec,
            [i.prompt for i in request.items],
            [i.response for i in request.items],
            [i.meta for i in request.items],
        )
        return RewardResponse(rewards=rewards, stats={
            "reward_s": time.perf_counter() - started, "items": float(len(rewards)),
        })
