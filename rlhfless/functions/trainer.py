"""The trainer function: one GRPO/PPO update per request, publishing weights version v+1."""

from __future__ import annotations

import time

from rlhfless.api.spec import JobSpec
from rlhfless.api.wire import TrainRequest, TrainResponse
from rlhfless.functions.app import FunctionError
from rlhfless.functions.device import on_device
from rlhfless.functions.versions import VersionedCache
from rlhfless.model.materialize import CRITIC_PART, load_critic_from_store, load_from_store
from rlhfless.store import DEFAULT_PART, WeightStore, load_optimizer_state, save_optimizer_state
from rlhfless.train.batch import TrainBatch
from rlhfless.train.deepspeed_config import full_fp32_state_dict
from rlhfless.train.update import PolicyTrainer


class TrainerHandler:
    stage = "trainer"

    def __init__(self, store: WeightStore, spec: JobSpec):
        self.store = store
        self.spec = spec
        self.cache: VersionedCache[PolicyTrainer] = VersionedCache(store, self._load)

    def _load(self, version: int) -> PolicyTrainer:
        model = on_device(load_from_store(self.store, version)[0])
        critic = (
            on_device(load_critic_from_store(self.store, version))
            if self.spec.stages.has("critic") else None
        )
        trainer = PolicyTrainer(model, self.spec.algorithm, self.spec.trainer, critic,
                                seed=self.spec.seed + version)
        state = load_optimizer_state(self.store, version)
        if state is not None:
            trainer.load_state_dict(state)
        return trainer

    def loaded_version(self) -> int | None:
        return self.cache.version

    def warm(self, latest: int) -> None:
        self.cache.get(latest)

    def _check(self, batch: TrainBatch) -> None:
        if self.spec.stages.has("reference") and batch.ref_logprobs is None:
            raise ValueError("klBeta > 0 needs ref_logprobs")
        if self.spec.stages.has("critic") and batch.returns is None:
            raise ValueError("ppo needs returns and old_values")

    def handle(self, request: TrainRequest) -> TrainResponse:
        trainer = self.cache.get(request.weights_version)
        try:
            batch = TrainBatch.from_lists(**request.model_dump(
                include={"prompts", "groups", "advantages", "ref_logprobs", "old_logprobs",
                         "returns", "old_values"}))
            self._check(batch)
        except ValueError as exc:
            raise FunctionError(422, f"invalid batch: {exc}") from None
        started = time.perf_counter()
        stats = trainer.step(batch)
        train_s = time.perf_counter() - started
        new_version = request.weights_version + 1
        # fp32 master weights (DeepSpeed bf16 / ZeRO shards gathered), on the CPU.
        parts = {DEFAULT_PART: full_fp32_state_dict(trainer.model)}
        if trainer.critic is not None:
            parts[CRITIC_PART] = full_fp32_state_dict(trainer.critic)
        save_optimizer_state(self.store, new_version, trainer.state_dict())
        # A version left by a step that was never checkpointed is replaced, not reused.
        self.store.save_parts(new_version, parts, {"trained_from": request.weights_version},
                              overwrite=True)
        # The weights in memory are now exactly the new version: no reload on the next step.
        self.cache.version, self.cache.value = new_version, trainer
        tokens = float(sum(len(r) for g in request.groups for r in g))
        return TrainResponse(weights_version=new_version, stats={
            **{k: float(v) for k, v in stats.items()}, "train_s": train_s, "tokens": tokens,
        })
