"""Request and response contracts of the stage functions (the same on every runtime).

Token ids travel as plain integer lists. Every request carries a request id (retries reuse it,
so a function can answer a repeat from its cache) and, where weights matter, the version.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

TokenIds = list[int]
# How a function instance on a cluster receives its job: the custom resource as JSON.
JOB_ENV = "RLHFJOB_SPEC"
# The job's shared secret: every call to a stage function carries it as a bearer token.
TOKEN_ENV = "RLHFLESS_TOKEN"


def bearer(token: str) -> dict[str, str]:
    """The request header that authenticates a caller to the job's functions."""
    return {"Authorization": f"Bearer {token}"}

MAX_BATCH = 65536


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(..., min_length=1, max_length=256)


class VersionedRequest(Request):
    weights_version: int = Field(..., ge=0)


class RolloutPrompt(BaseModel):
    """One prompt and which of its samples to produce.

    `sample_indices` lets a migrated continuation keep each sample's identity (its RNG stream);
    `prefixes[i]` is the partial response already generated for `sample_indices[i]`.
    """

    model_config = ConfigDict(extra="forbid")
    key: str = Field(..., min_length=1)
    prompt_ids: TokenIds = Field(..., min_length=1)
    sample_indices: list[int] = Field(..., min_length=1)
    prefixes: list[TokenIds] | None = None

    @model_validator(mode="after")
    def _prefixes_match(self) -> RolloutPrompt:
        if self.prefixes is not None and len(self.prefixes) != len(self.sample_indices):
            raise ValueError("prefixes must have one entry per sample index")
        return self


class ActorRequest(VersionedRequest):
    prompts: list[RolloutPrompt] = Field(..., min_length=1, max_length=MAX_BATCH)
    max_new_tokens: int = Field(..., ge=1, le=32768)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    cut_fraction: float | None = Field(
        None, gt=0, le=1, description="Return once this fraction of samples has finished."
    )


class RolloutSample(BaseModel):
    key: str
    index: int
    response: TokenIds
    logprobs: list[float]
    finished: bool


class ActorResponse(BaseModel):
    samples: list[RolloutSample]
    stats: dict[str, float]


class ScoreRequest(VersionedRequest):
    """Reference log-probs or critic values for groups of responses sharing a prompt."""

    prompts: list[TokenIds] = Field(..., min_length=1, max_length=MAX_BATCH)
    groups: list[list[TokenIds]] = Field(..., min_length=1)
    dedup_prefill: bool = True

    @model_validator(mode="after")
    def _one_group_per_prompt(self) -> ScoreRequest:
        if len(self.groups) != len(self.prompts):
            raise ValueError("groups must have one entry per prompt")
        if any(not p for p in self.prompts):
            raise ValueError("prompts must not be empty")
        return self


class ScoreResponse(BaseModel):
    values: list[list[list[float]]]
    stats: dict[str, float]


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


class TrainRequest(VersionedRequest):
    """One policy (and critic) update on a scored batch, published as `new_version`.

    The store is append-only: a `new_version` that already exists is refused (409) unless
    it was written by this very request (then it is answered from what exists). The driver
    picks one above every version used so far (`WeightStore.next_version`).
    """

    new_version: int | None = Field(
        None, ge=1, description="Version to publish; default weights_version + 1.")
    prompts: list[TokenIds] = Field(..., min_length=1, max_length=MAX_BATCH)
    groups: list[list[TokenIds]]
    advantages: list[list[list[float]]]
    ref_logprobs: list[list[list[float]]] | None = None
    old_logprobs: list[list[list[float]]] | None = None
    returns: list[list[list[float]]] | None = None
    old_values: list[list[list[float]]] | None = None

    @model_validator(mode="after")
    def _shapes_agree(self) -> TrainRequest:
        for name in ("advantages", "ref_logprobs", "old_logprobs", "returns", "old_values"):
            per_token = getattr(self, name)
            if per_token is None:
                continue
            if len(per_token) != len(self.groups):
                raise ValueError(f"{name} must have one entry per group")
            for g, (group, values) in enumerate(zip(self.groups, per_token, strict=True)):
                if [len(r) for r in group] != [len(v) for v in values]:
                    raise ValueError(f"{name}[{g}] must match the response lengths")
        if len(self.groups) != len(self.prompts):
            raise ValueError("groups must have one entry per prompt")
        if self.new_version is not None and self.new_version <= self.weights_version:
            raise ValueError("new_version must be above weights_version")
        return self

    @property
    def target_version(self) -> int:
        return self.new_version if self.new_version is not None else self.weights_version + 1


class TrainResponse(BaseModel):
    weights_version: int
    stats: dict[str, float]


REQUESTS: dict[str, type[Request]] = {
    "actor": ActorRequest,
    "reference": ScoreRequest,
    "critic": ScoreRequest,
    "reward": RewardRequest,
    "trainer": TrainRequest,
}
