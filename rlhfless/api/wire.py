"""Request and response contracts of the stage functions (the same on every runtime).

Token ids, log-probs and values are numpy arrays (int32 / float32) inside the models. They
travel raw in the binary codec (`rlhfless.api.codec`); a JSON body may carry them as plain
lists (they are converted on validation, and `model_dump(mode="json")` turns them back
into lists). Every request carries a request id (retries reuse it, so a function can answer
a repeat from its cache) and, where weights matter, the version.

The step's three stages speak three contracts:
- actor: `ActorRequest` → a stream of frames (`HelloFrame`, `SamplesFrame` as samples finish,
  `ProgressFrame` at τ, then `EndFrame` or `CutFrame`); while it streams, the actor takes
  `ActorCut` / `ActorMerge` on its control endpoint (instance-addressed).
- reward (or scorer, a reward model): `RewardRequest` → `RewardResponse` (JSON: decoded text
  in, floats out).
- learner: `LearnerBegin` → `LearnerAdd` × groups → `LearnerFinish` (one optimizer step,
  published as a new weights version the driver chose). A group is sent inline or as a
  shard of the job's store, referenced by id.
Every call carries the job's bearer token (`bearer`, `TOKEN_ENV`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    model_validator,
)

# How a function instance on a cluster receives its job: the custom resource as JSON.
JOB_ENV = "RLHFJOB_SPEC"
# Share (0-1] of each of its GPUs' memory an instance may take, when a runtime packs several
# instances onto one GPU (unset: the GPUs are the instance's own).
GPU_SHARE_ENV = "RLHFLESS_GPU_MEMORY_SHARE"
# The job's shared secret: every call to a stage function carries it as a bearer token.
TOKEN_ENV = "RLHFLESS_TOKEN"


def bearer(token: str) -> dict[str, str]:
    """The request header that authenticates a caller to the job's functions."""
    return {"Authorization": f"Bearer {token}"}

MAX_BATCH = 65536
# The header a function names itself in (the pod's hostname on a cluster), so a runtime can
# attribute busy time to instances and address a streaming actor directly.
INSTANCE_HEADER = "x-rlhfless-instance"
INSTANCE_ENV = "RLHFLESS_INSTANCE"  # the name a runtime gives an instance it starts


def _array(dtype: str, integer: bool):
    def validate(value: Any) -> np.ndarray:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        if arr.ndim != 1:
            raise ValueError(f"expected a flat array, got {arr.ndim} dimensions")
        if arr.size and integer and arr.dtype.kind not in "iu":
            raise ValueError("expected integers")
        if (arr.size and integer and (arr.dtype.itemsize > 4 or arr.dtype.kind == "u")
                and (arr.min() < -(1 << 31) or arr.max() >= 1 << 31)):
            raise ValueError("expected 32-bit integers")  # never wrapped into another id
        if arr.size and not integer and arr.dtype.kind not in "iuf":
            raise ValueError("expected numbers")
        return arr.astype(dtype, copy=False)

    return validate


def _as_list(arr: np.ndarray) -> list:
    return arr.tolist()


TokenArray = Annotated[Any, PlainValidator(_array("<i4", True)),
                       PlainSerializer(_as_list, when_used="json")]
FloatArray = Annotated[Any, PlainValidator(_array("<f4", False)),
                       PlainSerializer(_as_list, when_used="json")]


def nonempty(arrays: list[np.ndarray]) -> bool:
    return all(a.size > 0 for a in arrays)


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(..., min_length=1, max_length=256)


class VersionedRequest(Request):
    weights_version: int = Field(..., ge=0)


# ---- actor ---------------------------------------------------------------------------------
class RolloutPrompt(BaseModel):
    """One prompt and which of its samples to produce.

    `sample_indices` keeps each sample's identity (its random stream); `prefixes[i]`, when
    given, is the partial response already generated for `sample_indices[i]` (a hand-off or
    a re-run continues it). `max_new_tokens`, when given, is this prompt's own response
    budget (the request's still caps it).
    """

    model_config = ConfigDict(extra="forbid")
    key: str = Field(..., min_length=1)
    prompt_ids: TokenArray
    sample_indices: list[int] = Field(..., min_length=1)
    prefixes: list[TokenArray] | None = None
    max_new_tokens: int | None = Field(None, ge=1, le=32768)

    @model_validator(mode="after")
    def _prefixes_match(self) -> RolloutPrompt:
        if self.prompt_ids.size == 0:
            raise ValueError("prompt_ids must not be empty")
        if self.prefixes is not None and len(self.prefixes) != len(self.sample_indices):
            raise ValueError("prefixes must have one entry per sample index")
        if len(set(self.sample_indices)) != len(self.sample_indices):
            raise ValueError("sample_indices must be distinct")
        return self


class ActorRequest(VersionedRequest):
    prompts: list[RolloutPrompt] = Field(..., min_length=1, max_length=MAX_BATCH)
    max_new_tokens: int = Field(..., ge=1, le=32768)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    cut_fraction: float | None = Field(
        None, gt=0, le=1,
        description="Report a ProgressFrame once this fraction of the request's samples has "
                    "finished (the driver may then cut the actor).",
    )


class RolloutSample(BaseModel):
    key: str
    index: int
    response: TokenArray
    logprobs: FloatArray
    finished: bool
    # When the sample finished (Unix seconds, the actor's clock); absent from actors that do
    # not report it, and for unfinished (cut) samples. Feeds the rollout-tail accounting.
    finished_at: float | None = None


class HelloFrame(BaseModel):
    type: Literal["hello"] = "hello"
    instance: str


class SamplesFrame(BaseModel):
    """Finished samples: every sample of one prompt this actor held, once all are done."""

    type: Literal["samples"] = "samples"
    samples: list[RolloutSample]
    in_flight: int  # samples this actor still generates


class ProgressFrame(BaseModel):
    """τ reached: `done` of the request's own `own` samples have finished."""

    type: Literal["progress"] = "progress"
    done: int
    own: int
    in_flight: int


class CutFrame(BaseModel):
    """The last frame of a cut actor: finished samples not yet reported and the unfinished
    ones (partial responses) to hand off."""

    type: Literal["cut"] = "cut"
    finished: list[RolloutSample]
    unfinished: list[RolloutSample]
    stats: dict[str, float]


class EndFrame(BaseModel):
    type: Literal["end"] = "end"
    stats: dict[str, float]


class ErrorFrame(BaseModel):
    type: Literal["error"] = "error"
    status: int
    message: str


ActorFrame = Annotated[HelloFrame | SamplesFrame | ProgressFrame | CutFrame | EndFrame
                       | ErrorFrame, Field(discriminator="type")]


class ActorCut(Request):
    """Stop the running rollout `rollout_id` at its next step and hand back its unfinished
    samples (they arrive as the stream's CutFrame)."""

    op: Literal["cut"] = "cut"
    rollout_id: str


class ActorMerge(VersionedRequest):
    """Continue these samples inside the running rollout. Accepted only while a rollout
    runs with the same version and sampling settings (`accepted: false` otherwise)."""

    op: Literal["merge"] = "merge"
    max_new_tokens: int = Field(..., ge=1, le=32768)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    prompts: list[RolloutPrompt] = Field(..., min_length=1, max_length=MAX_BATCH)


ActorControl = Annotated[ActorCut | ActorMerge, Field(discriminator="op")]


class ControlReply(BaseModel):
    accepted: bool
    message: str = ""


# ---- reward --------------------------------------------------------------------------------
class RewardItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    response: str
    meta: dict[str, Any] = Field(default_factory=dict)


class RewardRequest(Request):
    items: list[RewardItem] = Field(..., min_length=1, max_length=MAX_BATCH)


class RewardResponse(BaseModel):
    rewards: list[float]
    stats: dict[str, float]


# ---- learner -------------------------------------------------------------------------------
class GroupData(BaseModel):
    """One scored GRPO group (PPO: one prompt's responses): what the learner trains on."""

    model_config = ConfigDict(extra="forbid")
    group_id: str = Field(..., min_length=1)
    prompt_ids: TokenArray
    responses: list[TokenArray] = Field(..., min_length=1)
    rewards: list[float]
    logprobs: list[FloatArray] | None = None  # the actor's (behaviour) log-probs

    @model_validator(mode="after")
    def _shapes_agree(self) -> GroupData:
        if self.prompt_ids.size == 0:
            raise ValueError("prompt_ids must not be empty")
        if len(self.rewards) != len(self.responses):
            raise ValueError("rewards must have one value per response")
        if self.logprobs is not None and [a.size for a in self.logprobs] != [
                r.size for r in self.responses]:
            raise ValueError("logprobs must match the response lengths")
        return self


class LearnerBegin(VersionedRequest):
    """Open step `step` on weights `weights_version`: the groups it will receive."""

    op: Literal["begin"] = "begin"
    step: int = Field(..., ge=1)
    group_ids: list[str] = Field(..., min_length=1, max_length=MAX_BATCH)

    @model_validator(mode="after")
    def _distinct(self) -> LearnerBegin:
        if len(set(self.group_ids)) != len(self.group_ids):
            raise ValueError("group_ids must be distinct")
        return self


class LearnerAdd(VersionedRequest):
    """One group of the open step: inline (`group`) or a shard of the store (`shard`)."""

    op: Literal["add"] = "add"
    step: int = Field(..., ge=1)
    group: GroupData | None = None
    shard: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> LearnerAdd:
        if (self.group is None) == (self.shard is None):
            raise ValueError("give exactly one of group or shard")
        return self


class LearnerFinish(VersionedRequest):
    """Apply the step's one optimizer step (all groups in) and publish it as `new_version`.

    The store is append-only: a `new_version` that already exists is refused (409) unless
    this very request published it (then it is answered from what exists). The driver picks
    one above every version used so far (`WeightStore.next_version`).
    """

    op: Literal["finish"] = "finish"
    step: int = Field(..., ge=1)
    new_version: int | None = Field(
        None, ge=1, description="Version to publish; default weights_version + 1.")

    @model_validator(mode="after")
    def _above(self) -> LearnerFinish:
        if self.new_version is not None and self.new_version <= self.weights_version:
            raise ValueError("new_version must be above weights_version")
        return self

    @property
    def target_version(self) -> int:
        return self.new_version if self.new_version is not None else self.weights_version + 1


LearnerRequest = Annotated[LearnerBegin | LearnerAdd | LearnerFinish,
                           Field(discriminator="op")]


class BeginReply(BaseModel):
    step: int
    groups_expected: int
    stats: dict[str, float] = Field(default_factory=dict)


class AddReply(BaseModel):
    group_id: str
    added: bool  # False: this group was already in (a retry or a duplicate report)
    groups_in: int
    stats: dict[str, float] = Field(default_factory=dict)


class TrainResponse(BaseModel):
    weights_version: int
    stats: dict[str, float]


# What each stage's `/invoke` accepts, and its `/control` (instance-addressed) endpoint.
REQUESTS: dict[str, Any] = {
    "actor": ActorRequest,
    "reward": RewardRequest,
    "scorer": RewardRequest,  # the reward model speaks the reward function's contract
    "learner": LearnerRequest,
}
CONTROLS: dict[str, Any] = {
    "actor": ActorControl,
}
# Error codes a function may attach to a refusal, for callers that recover from them.
STEP_NOT_OPEN = "step_not_open"
GROUPS_MISSING = "groups_missing"
