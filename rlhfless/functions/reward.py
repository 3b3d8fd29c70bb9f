"""The reward function: rewards on decoded text (no weights, no GPU)."""

from __future__ import annotations

import time

from rlhfless.api.spec import RewardSpec
from rlhfless.api.wire import RewardRequest, RewardResponse
from rlhfless.rewards import compute_rewards
from rlhfless.rewards.registry import leaf_rewards


class RewardHandler:
    stage = "reward"

    def __init__(self, spec: RewardSpec):
        self.spec = spec

    def loaded_version(self) -> int | None:
        return None

    def warm(self, latest: int) -> None:
        """Start a math-verify helper before serving, so the first request does not pay for
        its imports (they count in the function's cold start instead)."""
        if any(name == "math" for name, _ in leaf_rewards(self.spec.name, self.spec.args)):
            from rlhfless.rewards.mathverify import math_pool

            math_pool().prestart()

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
