"""The learner function: the fused reference + critic + policy update, fed group by group.

One instance holds the policy being trained, the frozen reference (version 0, only when
klBeta > 0) and, for PPO, the critic: one cold start and one model load per job instead of
three. A step is three kinds of request:

    LearnerBegin(step, weights_version v, group_ids)   open the step on weights v
    LearnerAdd(step, group | shard)  × groups           ref log-probs, values, advantages and
                                                        the gradient, at once; a group id
                                                        already in counts once
    LearnerFinish(step, new_version)                    one optimizer step; publishes
                                                        `new_version` (default v+1)

The store is append-only. `finish` publishes the weights, the critic and the optimizer state
(a safetensors part) as one new version, with the finish request's sha256 and the step's
statistics in its manifest. A repeated finish (a retry after a lost reply, on this or any
instance) is answered from what was published; any other request aiming at a version that
exists is refused with 409 (versions are never rewritten). The driver picks `new_version`
above every version used so far, so a step redone after a crash never meets its orphan. An
update whose statistics are not finite (NaN/Inf) publishes nothing and drops the in-memory
state: the next step starts again from the store.

A learner request, once started, runs to its end even if its caller leaves (an add is one
group's forward and backward; a half-applied optimizer step would be worse than a finished
one, whose retry the manifest answers); one that was still queued is not served.

An add or finish for a step this instance has not begun (it restarted, or the step was
never opened) is refused with 409 `step_not_open`: the driver begins the step again and
re-sends its groups from the store's shards. `finish` before every group is in is refused
with 409 `groups_missing`, naming them.

With `ranks` (an instance with `resources.learner.gpus: N > 1`, started by
rlhfless.functions.learner_ranks) this handler runs on every rank, on the same requests:
the models are sharded (FSDP2), each rank takes a share of every group, and `finish` gathers
the full state once on every rank while only rank 0 writes the version: the same files a
one-rank learner writes.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from pydantic import BaseModel

from rlhfless.api.spec import JobSpec
from rlhfless.api.wire import (
    STEP_NOT_OPEN,
    AddReply,
    BeginReply,
    GroupData,
    LearnerAdd,
    LearnerBegin,
    LearnerFinish,
    TrainResponse,
)
from rlhfless.functions.app import FunctionError
from rlhfless.functions.device import on_device
from rlhfless.functions.versions import VersionedCache
from rlhfless.functions.vocab import Vocabulary, group
from rlhfless.model.materialize import CRITIC_PART, load_critic_from_store, load_from_store
from rlhfless.store import (
    DEFAULT_PART,
    OPTIMIZER_PART,
    ShardError,
    ShardStore,
    VersionExistsError,
    WeightStore,
    load_optimizer_state,
    optimizer_part,
)
from rlhfless.train.deepspeed_config import full_fp32_state_dict
from rlhfless.train.distributed import (
    DistributedPolicyTrainer,
    DistributedStreamingLearner,
    Ranks,
    shard_frozen,
)
from rlhfless.train.streaming import GroupInput, LearnerStateError, StreamingLearner
from rlhfless.train.update import PolicyTrainer, step_seed


def _full_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """fp32 CPU weights to publish: gathered from the shards (collective) when sharded."""
    sharded = getattr(optimizer, "sharded", None)
    return sharded.full_state_dict() if sharded is not None else full_fp32_state_dict(model)


class LearnerHandler:
    stage = "learner"

    def __init__(self, store: WeightStore, spec: JobSpec, ranks: Ranks | None = None):
        self.store = store
        self.spec = spec
        self.ranks = ranks
        self._writes = ranks is None or ranks.rank == 0  # rank 0 publishes
        self.shards = ShardStore(store.root)
        self.cache: VersionedCache[StreamingLearner] = VersionedCache(store, self._load)
        self.vocabulary = Vocabulary(store)
        self._reference = None

    def _reference_model(self):
        if self.spec.algorithm.kl_beta <= 0:
            return None
        if self._reference is None:
            # The reference policy is the initial weights, version 0, for the whole job.
            self._reference = on_device(load_from_store(self.store, 0)[0]).eval()
            for p in self._reference.parameters():
                p.requires_grad_(False)
            if self.ranks is not None:
                self._reference = shard_frozen(self._reference, self.ranks,
                                               self.spec.trainer.cpu_offload)
        return self._reference

    def _load(self, version: int) -> StreamingLearner:
        algo = self.spec.algorithm
        model = on_device(load_from_store(self.store, version)[0])
        critic = (on_device(load_critic_from_store(self.store, version))
                  if algo.name == "ppo" else None)
        if self.ranks is None:
            trainer = PolicyTrainer(model, algo, self.spec.trainer, critic, seed=self.spec.seed)
        else:
            trainer = DistributedPolicyTrainer(model, algo, self.spec.trainer, self.ranks,
                                               critic, seed=self.spec.seed)
        state = load_optimizer_state(self.store, version)
        if state is not None:
            trainer.load_state_dict(state)
        if self.ranks is None:
            return StreamingLearner(trainer, algo, algo.group_size, self._reference_model())
        return DistributedStreamingLearner(trainer, algo, algo.group_size,
                                           self._reference_model())

    def loaded_version(self) -> int | None:
        return self.cache.version

    def warm(self, latest: int) -> None:
        self.cache.get(latest)

    def handle(self, request: LearnerBegin | LearnerAdd | LearnerFinish) -> BaseModel:
        try:
            if isinstance(request, LearnerBegin):
                return self._begin(request)
            if isinstance(request, LearnerAdd):
                return self._add(request)
            return self._finish(request)
        except LearnerStateError as exc:
            raise FunctionError(409, str(exc), exc.code) from None

    def _begin(self, request: LearnerBegin) -> BeginReply:
        started = time.perf_counter()
        learner = self.cache.get(request.weights_version)
        learner.begin(request.step, request.group_ids, step_seed(self.spec.seed, request.step))
        return BeginReply(step=request.step, groups_expected=len(request.group_ids),
                          stats={"begin_s": time.perf_counter() - started,
                                 "streams_gradients": float(learner.streams_gradients)})

    def _open(self, request: LearnerAdd | LearnerFinish) -> StreamingLearner:
        learner = self.cache.value
        if (learner is None or self.cache.version != request.weights_version
                or learner.step != request.step):
            raise FunctionError(409, f"step {request.step} on weights v{request.weights_version}"
                                " is not open on this learner (it restarted, or the step was "
                                "not begun): begin it and send its groups again", STEP_NOT_OPEN)
        return learner

    def _add(self, request: LearnerAdd) -> AddReply:
        learner = self._open(request)
        group_data = request.group
        if group_data is None:
            assert request.shard is not None
            try:
                group_data = GroupData.model_validate(self.shards.get(request.shard))
            except ShardError as exc:
                raise FunctionError(404, str(exc)) from None
        self.vocabulary.check(group(group_data.prompt_ids, group_data.responses,
                                    "group" if request.group is not None else "shard"))
        added = learner.add_group(GroupInput(
            group_id=group_data.group_id, prompt=group_data.prompt_ids.tolist(),
            responses=[r.tolist() for r in group_data.responses],
            rewards=list(group_data.rewards)))
        return AddReply(group_id=group_data.group_id, added=added,
                        groups_in=len(learner.groups),
                        stats={"tokens": float(sum(r.size for r in group_data.responses))})

    def _drop(self) -> None:
        """Forget the in-memory state (half-updated, or not what was published): the next
        request loads its version from the store."""
        self.cache.version, self.cache.value = None, None

    def _already_published(self, request: LearnerFinish, digest: str) -> TrainResponse:
        """The reply for a target version that exists: its own earlier result, else 409."""
        version = request.target_version
        meta = self.store.meta(version)
        if meta.get("request_sha256") != digest:
            raise FunctionError(409, f"weights version {version} already exists (published by "
                                     f"request {meta.get('request_id')!r}); versions are never "
                                     "rewritten")
        return TrainResponse(weights_version=version, stats=dict(meta.get("stats", {})))

    def _finish(self, request: LearnerFinish) -> TrainResponse:
        new_version = request.target_version
        done = self.cache.value
        if (done is not None and self.cache.version == new_version
                and request.step in done.finished):
            # A repeated finish (its reply was lost): the step is already applied.
            return TrainResponse(weights_version=new_version, stats=done.finished[request.step])
        digest = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        if self.store.exists(new_version):
            return self._already_published(request, digest)
        learner = self._open(request)
        try:
            stats = {k: float(v) for k, v in learner.finish().items()}
        except LearnerStateError:
            raise  # refused before anything was applied (groups missing): the step stays open
        except BaseException:
            self._drop()  # the optimizer may be half-way: never reuse this state
            raise
        bad = sorted(k for k, v in stats.items() if not math.isfinite(v))
        if bad:
            self._drop()
            raise FunctionError(422, f"the update gave non-finite {', '.join(bad)}; weights "
                                     f"version {new_version} was not published")
        trainer = learner.trainer
        # fp32 master weights (DeepSpeed bf16 / ZeRO or FSDP shards gathered: every rank
        # takes part, rank 0 writes), on the CPU; the optimizer state (gathered whole, so it
        # resumes on any rank count) goes into the same version, covered by the same manifest.
        parts = {DEFAULT_PART: _full_state(trainer.model, trainer.policy_optimizer)}
        if trainer.critic is not None:
            parts[CRITIC_PART] = _full_state(trainer.critic, trainer.critic_optimizer)
        optimizer_state = trainer.state_dict()
        published = True
        if self._writes:
            parts[OPTIMIZER_PART], header = optimizer_part(optimizer_state)
            meta = {"trained_from": request.weights_version, "step": request.step,
                    "request_id": request.request_id, "request_sha256": digest, "stats": stats}
            try:
                self.store.save_parts(new_version, parts, meta,
                                      headers={OPTIMIZER_PART: header})
            except VersionExistsError:
                published = False
        if self.ranks is not None:
            # Every rank learns whether rank 0's write won (followers add 1 each).
            published = self.ranks.sum([float(published)])[0] == self.ranks.world
        if not published:
            self._drop()  # another writer won: what is published is not what we hold
            return self._already_published(request, digest)
        # The weights in memory are now exactly the new version: no reload on the next step.
        self.cache.version, self.cache.value = new_version, learner
        return TrainResponse(weights_version=new_version, stats=stats)
