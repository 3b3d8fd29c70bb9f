"""The scorer function: rewards from a reward model (`reward.name: reward_model`).

It speaks the reward function's contract (`RewardRequest` → `RewardResponse`: decoded text
in, floats out), so the driver treats both alike. The model is loaded once per instance,
before it reports ready (its load is part of the cold start), on the GPU when the instance
has one. A model that cannot be loaded leaves the instance up to say why on every request,
naming `spec.reward.model.path`, instead of a crash loop that says nothing to the driver.
"""

from __future__ import annotations

import time

from rlhfless.api.spec import JobSpec
from rlhfless.api.wire import RewardRequest, RewardResponse
from rlhfless.functions.app import FunctionError
from rlhfless.functions.cancel import check
from rlhfless.functions.device import on_device
from rlhfless.model.loading import ModelLoadError
from rlhfless.model.reward_model import RewardModel, load_reward_model


class ScorerHandler:
    stage = "scorer"

    def __init__(self, spec: JobSpec):
        if spec.reward.model is None:
            raise ValueError("the scorer serves jobs whose reward is 'reward_model'")
        self.spec = spec
        self.scorer: RewardModel | None = None
        self.error: str | None = None
        self.load()

    def load(self) -> None:
        model_spec = self.spec.reward.model
        assert model_spec is not None
        try:
            model, tokenizer = load_reward_model(model_spec.path, model_spec.dtype)
        except ModelLoadError as exc:
            self.error = str(exc)
            return
        self.scorer = RewardModel(on_device(model), tokenizer,
                                  system_prompt=self.spec.dataset.system_prompt)

    def loaded_version(self) -> int | None:
        return None  # the reward model is frozen: no policy version lives here

    def handle(self, request: RewardRequest) -> RewardResponse:
        if self.scorer is None:
            raise FunctionError(500, f"the reward model is not loaded: {self.error}")
        started = time.perf_counter()
        rewards = self.scorer.score([i.prompt for i in request.items],
                                    [i.response for i in request.items], between=check)
        return RewardResponse(rewards=rewards, stats={
            "reward_s": time.perf_counter() - started, "items": float(len(rewards)),
        })
