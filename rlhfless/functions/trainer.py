"""The trainer function: one GRPO/PPO update per request, publishing a new weights version.

The store is append-only. A request whose target version exists is answered from that
version when this very request wrote it (a retry after a lost reply, on any instance), and
refused with 409 otherwise. An update whose statistics are not finite (NaN/Inf) publishes
nothing: the in-memory trainer is dropped, so the next request starts again from the store.
"""

from __future__ import annotations

import hashlib
import math
import time

from rlhfless.api.spec import JobSpec
from rlhfless.api.wire import TrainRequest, TrainResponse
from rlhfless.functions.app import FunctionError
from rlhfless.functions.device import on_device
from rlhfless.functions.versions import VersionedCache
from rlhfless.functions.vocab import Vocabulary, grouped
from rlhfless.model.materialize import CRITIC_PART, load_critic_from_store, load_from_store
from rlhfless.store import (
    DEFAULT_PART,
    OPTIMIZER_PART,
    VersionExistsError,
    WeightStore,
    load_optimizer_state,
    optimizer_part,
)
from rlhfless.train.batch import TrainBatch
from rlhfless.train.deepspeed_config import full_fp32_state_dict
from rlhfless.train.update import PolicyTrainer


class TrainerHandler:
    stage = "trainer"

    def __init__(self, store: WeightStore, spec: JobSpec):
        self.store = store
        self.spec = spec
        self.cache: VersionedCache[PolicyTrainer] = VersionedCache(store, self._load)
        self.vocabulary = Vocabulary(store)

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

    def _already_written(self, request: TrainRequest, digest: str) -> TrainResponse:
        """The reply for a target version that exists: its own earlier result, else 409."""
        version = request.target_version
        meta = self.store.meta(version)
        if meta.get("request_sha256") != digest:
            raise FunctionError(409, f"weights version {version} already exists (written by "
                                     f"request {meta.get('request_id')!r}); versions are never "
                                     "rewritten")
        return TrainResponse(weights_version=version, stats=dict(meta.get("stats", {})))

    def handle(self, request: TrainRequest) -> TrainResponse:
        digest = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        new_version = request.target_version
        if self.store.exists(new_version):
            return self._already_written(request, digest)
        self.vocabulary.check(grouped(request.prompts, request.groups))
        trainer = self.cache.get(request.weights_version)
        try:
            batch = TrainBatch.from_lists(**request.model_dump(
                include={"prompts", "groups", "advantages", "ref_logprobs", "old_logprobs",
                         "returns", "old_values"}))
            self._check(batch)
        except ValueError as exc:
            raise FunctionError(422, f"invalid batch: {exc}") from None
        started = time.perf_counter()
        try:
            stats = {k: float(v) for k, v in trainer.step(batch).items()}
        except BaseException:
            self.cache.version, self.cache.value = None, None  # half-updated: reload next time
            raise
        train_s = time.perf_counter() - started
        bad = sorted(k for k, v in stats.items() if not math.isfinite(v))
        if bad:
            # The optimizer may have moved on: never reuse this in-memory state.
            self.cache.version, self.cache.value = None, None
            raise FunctionError(422, f"the update gave non-finite {', '.join(bad)}; weights "
                                     f"version {new_version} was not published")
        tokens = float(sum(len(r) for g in request.groups for r in g))
        stats = {**stats, "train_s": train_s, "tokens": tokens}
        # fp32 master weights (DeepSpeed bf16 / ZeRO shards gathered), on the CPU; the
        # optimizer state goes into the same version, covered by the same manifest.
        parts = {DEFAULT_PART: full_fp32_state_dict(trainer.model)}
        if trainer.critic is not None:
            parts[CRITIC_PART] = full_fp32_state_dict(trainer.critic)
        parts[OPTIMIZER_PART], header = optimizer_part(trainer.state_dict())
        meta = {"trained_from": request.weights_version, "request_id": request.request_id,
                "request_sha256": digest, "stats": stats}
        try:
            self.store.save_parts(new_version, parts, meta, headers={OPTIMIZER_PART: header})
        except VersionExistsError:
            self.cache.version, self.cache.value = None, None
            return self._already_written(request, digest)
        # The weights in memory are now exactly the new version: no reload on the next step.
        self.cache.version, self.cache.value = new_version, trainer
        return TrainResponse(weights_version=new_version, stats=stats)
