"""The RLHF job specification: one typed model, validated once at the edge.

The YAML file and the Kubernetes custom resource share the same shape
(`apiVersion/kind/metadata/spec`); keys are camelCase there and snake_case here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from rlhfless.api.stages import StageTable, stage_table

API_GROUP = "rlhfless.io"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "RLHFJob"


class SpecModel(BaseModel):
    """Base: camelCase keys on the wire, unknown keys rejected, defaults filled."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )


class TinyModelSpec(SpecModel):
    vocab_size: int = Field(128, ge=16, le=65536, description="Vocabulary size (128 = ASCII).")
    n_layer: int = Field(2, ge=1, le=48, description="Transformer layers.")
    n_embd: int = Field(128, ge=8, le=8192, description="Hidden size.")
    n_head: int = Field(4, ge=1, le=128, description="Attention heads.")
    n_positions: int = Field(512, ge=16, le=32768, description="Max sequence length.")
    seed: int = Field(0, ge=0, description="Seed of the random initialisation.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelSpec:
        if self.n_embd % self.n_head:
            raise ValueError("nEmbd must be divisible by nHead")
        return self


class ModelSpec(SpecModel):
    source: Literal["tiny", "hf", "gguf"] = Field(
        "tiny", description="tiny random model, a local Hugging Face directory, or a GGUF file."
    )
    path: str | None = Field(
        None,
        description="Local directory (hf) or GGUF file (gguf); 'smollm2' names the bundled "
        "SmolLM2-135M-Instruct GGUF.",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` (gguf).")
    tiny: TinyModelSpec = Field(default_factory=TinyModelSpec)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype (float32 on CPU)."
    )

    @model_validator(mode="after")
    def _path_when_needed(self) -> ModelSpec:
        if self.source in ("hf", "gguf") and not self.path:
            raise ValueError(f"path is required when source is '{self.source}'")
        return self


class AlgorithmSpec(SpecModel):
    name: Literal["grpo", "ppo"] = Field("grpo", description="RL algorithm.")
    group_size: int = Field(8, ge=1, le=256, description="Samples per prompt (GRPO group G).")
    advantage: Literal["grpo", "drgrpo", "gae"] | None = Field(
        None, description="Advantage estimator; default grpo for GRPO, gae for PPO."
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip range ε.")
    kl_beta: float = Field(0.0, ge=0, description="KL penalty coefficient β vs the reference.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator.")
    loss_agg: Literal[
        "token-mean", "seq-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = Field("token-mean", description="Loss aggregation (seq-mean-token-sum-norm: Dr.GRPO).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount γ (GAE).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    lr: float = Field(1e-5, gt=0, lt=1, description="Policy learning rate.")
    critic_lr: float = Field(1e-5, gt=0, lt=1, description="Critic learning rate (PPO).")
    ppo_epochs: int = Field(1, ge=1, le=64, description="Passes over each batch.")
    mini_batch_size: int = Field(
        16, ge=1, description="Responses per optimizer step (mini-batch)."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient.")
    value_clip: float = Field(0.2, gt=0, description="Value-loss clip range (PPO).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")

    @model_validator(mode="after")
    def _default_advantage(self) -> AlgorithmSpec:
        if self.advantage is None:
            self.advantage = "gae" if self.name == "ppo" else "grpo"
        if self.name == "ppo" and self.advantage != "gae":
            raise ValueError("ppo needs advantage 'gae' (it trains a critic)")
        if self.name == "grpo" and self.advantage == "gae":
            raise ValueError("grpo uses group advantages ('grpo' or 'drgrpo'), not 'gae'")
        return self


class DatasetSpec(SpecModel):
    kind: Literal["arithmetic", "jsonl", "repeat"] = Field(
        "arithmetic", description="Built-in arithmetic generator, a jsonl file, or a toy set."
    )
    path: str | None = Field(None, description="jsonl file (kind jsonl).")
    size: int = Field(256, ge=1, le=10_000_000, description="Prompts generated (built-ins).")
    prompts_per_step: int = Field(8, ge=1, le=65536, description="Prompts per RL step.")
    seed: int = Field(0, ge=0)
    system_prompt: str | None = Field(None, description="Shared system prompt, if any.")
    difficulty: int = Field(1, ge=1, le=5, description="Arithmetic difficulty.")

    @model_validator(mode="after")
    def _path_for_jsonl(self) -> DatasetSpec:
        if self.kind == "jsonl" and not self.path:
            raise ValueError("path is required when kind is 'jsonl'")
        return self


class RewardSpec(SpecModel):
    name: str = Field("exact_match", description="Registered rule-based reward.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments.")
    model_path: str | None = Field(None, description="Reward model directory (optional).")

    @model_validator(mode="after")
    def _known_reward(self) -> RewardSpec:
        from rlhfless.rewards import check_reward_args

        check_reward_args(self.name, self.args)
        return self


class GenerationSpec(SpecModel):
    max_new_tokens: int = Field(64, ge=1, le=32768, description="Response length cap.")
    temperature: float = Field(1.0, ge=0, le=10, description="Sampling temperature (0 greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="Rollout engine (vllm needs a GPU)."
    )


class StageResources(SpecModel):
    gpus: int = Field(1, ge=0, le=16, description="GPUs per function instance.")
    cpu: str = Field("4", description="CPU request (Kubernetes quantity).")
    memory: str = Field("32Gi", description="Memory request (Kubernetes quantity).")


class DriverResources(SpecModel):
    cpu: str = Field("2", description="CPU request of the driver pod (Kubernetes quantity).")
    memory: str = Field(
        "8Gi", description="Memory of the driver pod; it loads the base model once to write "
        "version 0, so at least the model's size in float32."
    )


class ResourcesSpec(SpecModel):
    driver: DriverResources = Field(default_factory=DriverResources)
    actor: StageResources = Field(default_factory=StageResources)
    reference: StageResources = Field(default_factory=StageResources)
    reward: StageResources = Field(default_factory=lambda: StageResources(gpus=0))
    critic: StageResources = Field(default_factory=StageResources)
    trainer: StageResources = Field(default_factory=StageResources)


class SchedulingSpec(SpecModel):
    actors: int = Field(2, ge=1, le=1024, description="Actor count when costAware is off.")
    max_actors: int = Field(4, ge=1, le=1024, description="Upper bound on actor functions.")
    lam: float = Field(
        0.5, ge=0, le=1, description="λ: 1 = fastest step, 0 = fewest GPU-seconds."
    )
    tau: float = Field(0.7, gt=0, le=1, description="τ: cut an actor when this fraction is done.")
    ewma_alpha: float = Field(0.5, gt=0, le=1, description="EWMA weight of the newest length.")
    length_prediction: bool = Field(True, description="Predict response lengths.")
    assignment: Literal["length-aware", "round-robin", "random"] = Field("length-aware")
    cut_migrate: bool = Field(True, description="Cut and migrate the long tail.")
    cost_aware: bool = Field(True, description="Choose the actor count by λ.")
    prewarm: bool = Field(True, description="Start the next phase's functions ahead.")
    dedup_prefill: bool = Field(True, description="Compute shared prompt prefixes once.")
    keep_alive_s: float = Field(
        30.0, ge=0, le=3600, description="Idle seconds before an instance scales to zero."
    )

    @model_validator(mode="after")
    def _actors_within_max(self) -> SchedulingSpec:
        if self.actors > self.max_actors:
            raise ValueError("actors must not exceed maxActors")
        return self


class TrainerSpec(SpecModel):
    backend: Literal["torch", "deepspeed"] = Field("torch", description="Optimizer backend.")
    zero_stage: Literal[0, 2, 3] = Field(0, description="DeepSpeed ZeRO stage.")
    grad_checkpointing: bool = Field(False, description="Recompute activations in backward.")


class CheckpointSpec(SpecModel):
    every_steps: int = Field(1, ge=1, description="Checkpoint every this many steps.")
    keep: int = Field(3, ge=1, description="Weight versions kept in the store.")


class JobSpec(SpecModel):
    model: ModelSpec = Field(default_factory=ModelSpec)
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    reward: RewardSpec = Field(default_factory=RewardSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    steps: int = Field(10, ge=1, le=10_000_000, description="RL steps to run.")
    seed: int = Field(0, ge=0, description="Seed of sampling and shuffling.")
    suspend: bool = Field(False, description="Stop after the current step and scale to zero.")

    @property
    def stages(self) -> StageTable:
        """Which stage functions this job has (the one answer; see rlhfless.api.stages)."""
        return stage_table(self)

    @model_validator(mode="after")
    def _batch_fits(self) -> JobSpec:
        tiny = self.model.tiny
        if self.model.source == "tiny" and self.generation.max_new_tokens >= tiny.n_positions:
            raise ValueError("generation.maxNewTokens must be below model.tiny.nPositions")
        return self


class Metadata(SpecModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(..., pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    namespace: str | None = None


class RLHFJob(SpecModel):
    api_version: Literal["rlhfless.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["RLHFJob"] = KIND
    metadata: Metadata
    spec: JobSpec = Field(default_factory=JobSpec)


class SpecError(Exception):
    """A job file or resource that does not validate; `errors` names each bad field."""

    def __init__(self, errors: list[str], source: str = "job"):
        self.errors = errors
        self.source = source
        super().__init__(f"{source}: " + "; ".join(errors))


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        else:
            path += ("." if path else "") + to_camel(str(item))
    return path or "(root)"


def _format_errors(exc: ValidationError) -> list[str]:
    messages = []
    for err in exc.errors():
        path = _field_path(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        messages.append(f"{path}: {msg}")
    return messages


def parse_job(document: Any, source: str = "job") -> RLHFJob:
    """Validate a parsed YAML/JSON document; raise SpecError listing every bad field."""
    if not isinstance(document, dict):
        raise SpecError(["(root): expected a mapping with apiVersion, kind, metadata, spec"],
                        source)
    try:
        return RLHFJob.model_validate(document)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc), source) from None


def parse_spec(spec: Any, name: str = "job", source: str = "spec") -> RLHFJob:
    """Validate a bare `spec` mapping (what the operator receives)."""
    return parse_job(
        {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec or {}},
        source,
    )


def load_job(path: str | Path) -> RLHFJob:
    """Read a job file; every problem (missing file, YAML syntax, bad field) is a SpecError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([f"cannot read {path}: {exc.strerror}"], str(path)) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([f"invalid YAML: {exc}"], str(path)) from None
    return parse_job(document, str(path))


def dump_job(job: RLHFJob) -> dict[str, Any]:
    """The job as a camelCase document (round-trips through parse_job)."""
    return job.model_dump(by_alias=True, mode="json", exclude_none=True)
