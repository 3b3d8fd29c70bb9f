"""The RLHF job specification: one typed model, validated once at the edge.

The YAML file and the Kubernetes custom resource share the same shape
(`apiVersion/kind/metadata/spec`); keys are camelCase there and snake_case here.
"""

from __future__ import annotations

import functools
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from rlhfless.api.errors import FieldError, SpecError
from rlhfless.api.names import name_errors, namespace_errors
from rlhfless.api.quantity import (
    MAX_QUANTITY_LENGTH,
    QUANTITY_PATTERN,
    check_quantity,
    quantity_is_text,
)
from rlhfless.api.stages import REWARD_MODEL, STAGE_NAMES, StageTable, stage_table
from rlhfless.api.yamlload import json_problem, read_document

API_GROUP = "rlhfless.io"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "RLHFJob"
INT64_MAX = 2**63 - 1  # the API server stores integers as int64


def _exact_int(value: Any) -> Any:
    """Strict mode for an integer Literal (pydantic matches False to 0 and 2.0 to 2)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Input should be a valid integer, got {value!r}")
    return value


Quantity = Annotated[str, Field(max_length=MAX_QUANTITY_LENGTH,
                                json_schema_extra={"pattern": QUANTITY_PATTERN}),
                     BeforeValidator(quantity_is_text), AfterValidator(check_quantity)]


@functools.cache
def _non_nullable(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(
        field.alias or name for name, field in model.model_fields.items()
        if field.annotation is not Any and type(None) not in typing.get_args(field.annotation)
    )


class SpecModel(BaseModel):
    """Base: camelCase keys on the wire, unknown keys rejected, defaults filled.

    Strict: no coercion ("3" is not 3, true is not 1), as the API server's schema; an
    integer is a valid float (`lr: 1`), as `type: number` is there. A null value of a
    non-nullable field counts as absent (its default applies), as the API server prunes it.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
        validate_default=True,
        strict=True,
        allow_inf_nan=False,
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        prune = _non_nullable(cls)
        return {k: v for k, v in data.items() if not (v is None and k in prune)}


class TinyModelSpec(SpecModel):
    vocab_size: int = Field(128, ge=16, le=65536, description="Vocabulary size (128 = ASCII).")
    n_layer: int = Field(2, ge=1, le=48, description="Transformer layers.")
    n_embd: int = Field(128, ge=8, le=8192, description="Hidden size.")
    n_head: int = Field(4, ge=1, le=128, description="Attention heads.")
    n_positions: int = Field(512, ge=16, le=32768, description="Max sequence length.")
    seed: int = Field(0, ge=0, le=INT64_MAX, description="Seed of the random initialisation.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelSpec:
        if self.n_embd % self.n_head:
            raise FieldError("nEmbd", f"must be divisible by nHead ({self.n_head})")
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
    gguf_file: str | None = Field(
        None, description="GGUF file name inside the directory `path` (gguf)."
    )
    tiny: TinyModelSpec = Field(default_factory=TinyModelSpec)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of hf and gguf models (tiny: float32)."
    )

    @model_validator(mode="after")
    def _fields_that_apply(self) -> ModelSpec:
        if self.source in ("hf", "gguf") and not self.path:
            raise FieldError("path", f"is required when source is '{self.source}'")
        if self.source == "tiny" and self.path is not None:
            raise FieldError("path", "is only read when source is 'hf' or 'gguf'")
        if self.gguf_file is not None and (self.source != "gguf" or self.path == "smollm2"):
            raise FieldError("ggufFile", "is only read when source is 'gguf' and path is a "
                                         "directory (not 'smollm2')")
        if self.source == "tiny" and self.dtype != "float32":
            raise FieldError("dtype", "tiny models compute in float32; dtype applies to hf "
                                      "and gguf models")
        return self


class AlgorithmSpec(SpecModel):
    name: Literal["grpo", "ppo"] = Field("grpo", description="RL algorithm.")
    group_size: int = Field(8, ge=1, le=256, description="Samples per prompt (GRPO group G).")
    advantage: Literal["grpo", "drgrpo", "gae"] | None = Field(
        None, description="Advantage estimator; default grpo for GRPO, gae for PPO."
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip range ε.")
    kl_beta: float = Field(
        0.0, ge=0, le=10, description="KL penalty coefficient β vs the reference."
    )
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
        16, ge=1, le=INT64_MAX,
        description="Responses per optimizer step; must divide the batch "
        "(dataset.promptsPerStep × groupSize).",
    )
    entropy_coef: float = Field(0.0, ge=0, le=10, description="Entropy bonus coefficient.")
    value_clip: float = Field(0.2, gt=0, description="Value-loss clip range (PPO).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")

    @model_validator(mode="after")
    def _default_advantage(self) -> AlgorithmSpec:
        if self.advantage is None:
            self.advantage = "gae" if self.name == "ppo" else "grpo"
        if self.name == "ppo" and self.advantage != "gae":
            raise FieldError("advantage", "ppo needs 'gae' (it trains a critic)")
        if self.name == "grpo" and self.advantage == "gae":
            raise FieldError("advantage", "grpo uses group advantages ('grpo' or 'drgrpo'), "
                                          "not 'gae'")
        return self


DATASET_FILE_KINDS = ("parquet", "jsonl", "hf-disk")


class DatasetFields(SpecModel):
    """Where each field of a prompt lives in a file's rows; a dot reaches into a nested
    column (verl's `reward_model.ground_truth`)."""

    prompt: str = Field(
        "prompt", min_length=1,
        description="Column holding the prompt: a string or a list of chat messages "
        "({role, content}).",
    )
    answer: str | None = Field(
        None, min_length=1,
        description="Column holding the ground truth; default 'reward_model.ground_truth' "
        "when the file has that column, else 'answer'.",
    )
    id: str | None = Field(
        None, min_length=1,
        description="Column holding a unique prompt id; default 'id' when present, else "
        "<file name>-<row>.",
    )


class DatasetSpec(SpecModel):
    kind: Literal["arithmetic", "repeat", "parquet", "jsonl", "hf-disk"] = Field(
        "arithmetic",
        description="Built-in arithmetic generator, a toy set, or a local file: parquet "
        "(verl's schema by default), jsonl, or a directory written by datasets' save_to_disk.",
    )
    path: str | None = Field(None, description="Local file or directory (parquet, jsonl, "
                             "hf-disk).")
    fields: DatasetFields = Field(default_factory=DatasetFields,
                                  description="Column mapping for file datasets.")
    split: str = Field("train", min_length=1,
                       description="Split to read when an hf-disk directory holds several.")
    size: int = Field(256, ge=1, le=10_000_000, description="Prompts generated (built-ins).")
    prompts_per_step: int = Field(8, ge=1, le=65536, description="Prompts per RL step.")
    seed: int = Field(0, ge=0, le=INT64_MAX)
    system_prompt: str | None = Field(None, description="Shared system prompt, if any.")
    difficulty: int = Field(1, ge=1, le=5, description="Arithmetic difficulty.")

    @model_validator(mode="after")
    def _path_for_files(self) -> DatasetSpec:
        if self.kind in DATASET_FILE_KINDS and not self.path:
            raise FieldError("path", f"is required when kind is '{self.kind}'")
        if self.kind not in DATASET_FILE_KINDS and self.path:
            raise FieldError("path", f"kind '{self.kind}' reads no file; remove path or use "
                                     f"one of {', '.join(DATASET_FILE_KINDS)}")
        return self


class RewardModelSpec(SpecModel):
    """A sequence-classification model with one label: its logit is the reward."""

    path: str = Field(..., min_length=1, description="Local Hugging Face directory of the "
                      "reward model (a *ForSequenceClassification with numLabels 1).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of the reward model.")


class RewardSpec(SpecModel):
    name: str = Field("exact_match", description="Registered reward; 'reward_model' scores "
                      "with `model` in its own stage function (scorer).")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments.")
    workers: int | None = Field(
        None, ge=1, le=256,
        description="Responses scored at once by rewards that run outside the interpreter "
        "(math, code_tests); default: the CPU count.",
    )
    model: RewardModelSpec | None = Field(
        None, description="The reward model (name 'reward_model' only).")

    @model_validator(mode="after")
    def _known_reward(self) -> RewardSpec:
        from rlhfless.rewards import check_reward_args

        if self.name == REWARD_MODEL and self.model is None:
            raise FieldError("model", f"is required when name is '{REWARD_MODEL}'")
        if self.name != REWARD_MODEL and self.model is not None:
            raise FieldError("model", f"is only read when name is '{REWARD_MODEL}'")
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
    cpu: Quantity = Field("4", description="CPU request (Kubernetes quantity).")
    memory: Quantity = Field("32Gi", description="Memory request and limit (Kubernetes "
                             "quantity).")


class DriverResources(SpecModel):
    cpu: Quantity = Field("2", description="CPU request of the driver pod (Kubernetes "
                          "quantity).")
    memory: Quantity = Field(
        "8Gi", description="Memory of the driver pod; it loads the base model once to write "
        "version 0, so at least the model's size in float32."
    )


class ResourcesSpec(SpecModel):
    """Per stage function (see rlhfless.api.stages): the learner holds the policy, the frozen
    reference and the critic in one instance. `driver` is the job's driver pod on a
    cluster (not a stage)."""

    driver: DriverResources = Field(default_factory=DriverResources)
    actor: StageResources = Field(default_factory=StageResources)
    reward: StageResources = Field(default_factory=lambda: StageResources(gpus=0))
    scorer: StageResources = Field(
        default_factory=StageResources,
        description="The reward model's function (reward.name 'reward_model' only).")
    learner: StageResources = Field(default_factory=StageResources)


class SchedulingSpec(SpecModel):
    actors: int = Field(2, ge=1, le=1024, description="Actor count when costAware is off.")
    max_actors: int = Field(4, ge=1, le=1024, description="Upper bound on actor functions.")
    lam: float = Field(
        0.5, ge=0, le=1, description="λ: 1 = fastest step, 0 = fewest GPU-seconds "
        "(a streaming step trades only among plans within 2% of its fastest)."
    )
    tau: float = Field(
        1.0, gt=0, le=1,
        description="τ: at this fraction of its own samples done, an actor hands its unfinished "
        "samples to a running actor and scales down (1 = never).")
    ewma_alpha: float = Field(0.5, gt=0, le=1, description="EWMA weight of the newest length.")
    length_prediction: bool = Field(True, description="Predict response lengths.")
    assignment: Literal["length-aware", "round-robin", "random"] = Field("length-aware")
    cut_migrate: bool = Field(True, description="Hand the long tail off at τ (cut actors scale "
                              "down).")
    cost_aware: bool = Field(True, description="Choose the actor count by λ.")
    prewarm: bool = Field(True, description="Start the next phase's functions ahead.")
    dedup_prefill: bool = Field(True, description="Compute shared prompt prefixes once.")
    streaming: bool = Field(
        True, description="Score and learn each group as it finishes (off: the barrier step, "
        "every actor done before anything is scored; same weights, for comparisons).")
    keep_alive_s: float = Field(
        30.0, ge=0, le=3600, description="Idle seconds before an instance scales to zero."
    )

    @model_validator(mode="after")
    def _actors_within_max(self) -> SchedulingSpec:
        if self.actors > self.max_actors:
            raise FieldError("actors", f"must not exceed maxActors ({self.max_actors})")
        return self


class TrainerSpec(SpecModel):
    backend: Literal["torch", "deepspeed"] = Field("torch", description="Optimizer backend.")
    zero_stage: Annotated[Literal[0, 2, 3], BeforeValidator(_exact_int)] = Field(
        0, description="DeepSpeed ZeRO stage (backend deepspeed)."
    )
    grad_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    cpu_offload: bool = Field(
        False, description="Learner with resources.learner.gpus > 1 (FSDP2 ranks): keep the "
        "parameter and gradient shards and the optimizer step in host memory.")

    @model_validator(mode="after")
    def _zero_needs_deepspeed(self) -> TrainerSpec:
        if self.zero_stage and self.backend != "deepspeed":
            raise FieldError("zeroStage", "needs backend 'deepspeed' (the torch backend has "
                                          "no ZeRO)")
        return self


class CheckpointSpec(SpecModel):
    every_steps: int = Field(1, ge=1, le=INT64_MAX,
                             description="Checkpoint every this many steps.")
    keep: int = Field(3, ge=1, le=INT64_MAX, description="Weight versions kept in the store.")


class LoggingSpec(SpecModel):
    """TensorBoard event files are always written to the run directory; these add trackers."""

    backends: list[Literal["mlflow", "wandb"]] = Field(
        default_factory=list, description="Trackers that also receive every step's metrics."
    )
    project: str | None = Field(
        None, min_length=1,
        description="MLflow experiment / W&B project; default: the job name.",
    )
    mlflow_tracking_uri: str | None = Field(
        None, min_length=1,
        description="MLflow tracking URI; default: a file store in the run directory.",
    )
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="W&B mode; offline writes the run under the run directory."
    )

    @model_validator(mode="after")
    def _no_repeats(self) -> LoggingSpec:
        if len(set(self.backends)) != len(self.backends):
            raise ValueError("backends lists a tracker twice")
        return self


# A GPU type as price tables name it ("H100", "A100-80GB", "L40S"); matched case-insensitively.
GPU_TYPE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
GpuType = Annotated[str, Field(max_length=63, pattern=GPU_TYPE_PATTERN)]


class GpuPrice(SpecModel):
    on_demand: float | None = Field(
        None, ge=0, le=1_000_000, description="$ per GPU-hour, on demand."
    )
    spot: float | None = Field(None, ge=0, le=1_000_000, description="$ per GPU-hour, spot.")


class CostSpec(SpecModel):
    """What a GPU-second costs: dollars = GPU-seconds × the price of the stage's GPU type."""

    gpu_type: GpuType | None = Field(
        None, description="GPU type of every stage (default: the operator's cost.gpuType; "
        "H100 for `rlhfless run`)."
    )
    stage_gpu_types: dict[str, GpuType] = Field(
        default_factory=dict, description="GPU type per stage, overriding gpuType "
        "(keys: stage names, e.g. actor: L40S)."
    )
    pricing: Literal["onDemand", "spot"] | None = Field(
        None, description="Which price applies (default: the operator's cost.pricing; "
        "onDemand for `rlhfless run`)."
    )
    prices: dict[GpuType, GpuPrice] = Field(
        default_factory=dict, description="$ per GPU-hour by GPU type, over the built-in "
        "and the operator's table (rlhfless.cost.prices)."
    )

    @model_validator(mode="after")
    def _known_stages(self) -> CostSpec:
        for stage in self.stage_gpu_types:
            if stage not in STAGE_NAMES:
                raise FieldError(f"stageGpuTypes.{stage}",
                                 f"unknown stage; stages: {', '.join(STAGE_NAMES)}")
        return self


class BudgetSpec(SpecModel):
    """Spend limits: the job suspends (condition BudgetExceeded) before a step that would
    cross one; raising the limit resumes it."""

    max_gpu_hours: float | None = Field(
        None, gt=0, le=1e12, description="GPU-hours the job may use (GPUs × hours alive)."
    )
    max_dollars: float | None = Field(
        None, gt=0, le=1e12, description="Dollars the job may spend (needs a price for every "
        "GPU type it uses)."
    )

    @property
    def limited(self) -> bool:
        return self.max_gpu_hours is not None or self.max_dollars is not None


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
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    cost: CostSpec = Field(default_factory=CostSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    steps: int = Field(10, ge=1, le=10_000_000, description="RL steps to run.")
    seed: int = Field(0, ge=0, le=INT64_MAX, description="Seed of sampling and shuffling.")
    suspend: bool = Field(False, description="Stop after the current step and scale to zero.")

    @property
    def stages(self) -> StageTable:
        """Which stage functions this job has (the one answer; see rlhfless.api.stages)."""
        return stage_table(self)

    @model_validator(mode="after")
    def _batch_fits(self) -> JobSpec:
        tiny = self.model.tiny
        if self.model.source == "tiny" and self.generation.max_new_tokens >= tiny.n_positions:
            raise FieldError("generation.maxNewTokens",
                             f"must be below model.tiny.nPositions ({tiny.n_positions})")
        # One optimizer step per mini-batch, all of equal size: a remainder would get a
        # full step from fewer responses (verl refuses it too).
        learner_gpus = self.resources.learner.gpus
        if learner_gpus > 1 and self.trainer.backend != "torch":
            raise FieldError("trainer.backend",
                             f"a learner with resources.learner.gpus: {learner_gpus} runs "
                             f"{learner_gpus} ranks sharded with FSDP2: use backend 'torch' "
                             "(DeepSpeed trains one rank per instance)")
        if self.trainer.cpu_offload and learner_gpus <= 1:
            raise FieldError("trainer.cpuOffload", "offloads the shards of a multi-rank "
                             "learner: needs resources.learner.gpus > 1")
        batch = self.dataset.prompts_per_step * self.algorithm.group_size
        if batch % self.algorithm.mini_batch_size:
            raise FieldError("algorithm.miniBatchSize",
                             f"must divide the batch of dataset.promptsPerStep × "
                             f"algorithm.groupSize = {batch} responses, got "
                             f"{self.algorithm.mini_batch_size}")
        return self


# What ObjectMeta holds; anything else in `metadata` is a typo the API server refuses.
OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "labels", "annotations", "uid", "resourceVersion",
    "generation", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
    "finalizers", "ownerReferences", "managedFields", "selfLink",
})


def _job_name(name: str) -> str:
    errors = name_errors(name)
    if errors:
        raise ValueError("; ".join(errors))
    return name


def _namespace(namespace: str) -> str:
    errors = namespace_errors(namespace)
    if errors:
        raise ValueError("; ".join(errors))
    return namespace


class Metadata(SpecModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, AfterValidator(_job_name)] = Field(
        ..., description="The job's name (rlhfless.api.names)."
    )
    namespace: Annotated[str, AfterValidator(_namespace)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _object_meta_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in OBJECT_META_FIELDS:
                    raise FieldError(str(key), "unknown field")
        return data


class RLHFJob(SpecModel):
    api_version: Literal["rlhfless.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["RLHFJob"]
    metadata: Metadata
    spec: JobSpec = Field(default_factory=JobSpec)


DEFAULT_NAMESPACE = "default"


def job_namespace(job: RLHFJob) -> str:
    """The job's namespace: metadata.namespace, else "default" (as kubectl assumes)."""
    return job.metadata.namespace or DEFAULT_NAMESPACE


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for item in loc:
        path += f"[{item}]" if isinstance(item, int) else ("." if path else "") + str(item)
    return path or "(root)"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Fields a job may no longer set, and where that setting lives now.
_REMOVED = {
    ("spec", "image"): " (function and driver images come from the operator's configuration: "
                       "Helm values functions.images)",
}


def _format_errors(exc: ValidationError) -> list[str]:
    messages = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc, msg = (*loc, *cause.field.split(".")), cause.message
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown field" + _REMOVED.get(loc, "")
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            msg = f"must be a mapping, got {_shown(err['input'])}"
        elif kind.endswith("_type") or kind.endswith("_parsing"):
            msg = f"{msg}, got {_shown(err['input'])}"  # e.g. '3' (a string) for an integer
        messages.append(f"{_field_path(loc)}: {msg}")
    return messages


def parse_job(document: Any, source: str = "job") -> RLHFJob:
    """Validate a parsed YAML/JSON document; raise SpecError listing every bad field.

    Keys are read by their wire (camelCase) names only, as the API server reads them.
    """
    if not isinstance(document, dict):
        raise SpecError(["(root): expected a mapping with apiVersion, kind, metadata, spec"],
                        source)
    problem = json_problem(document)
    if problem is not None:
        raise SpecError([problem], source)
    try:
        return RLHFJob.model_validate(document, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc), source) from None


def parse_spec(spec: Any, name: str = "job", source: str = "spec") -> RLHFJob:
    """Validate a bare `spec` mapping (what the operator receives)."""
    return parse_job(
        {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec or {}},
        source,
    )


def load_job(path: str | Path) -> RLHFJob:
    """Read a job file; every problem (unreadable, too large, not UTF-8, YAML syntax,
    duplicate keys, alias bombs, bad fields) is a SpecError."""
    return parse_job(read_document(path), str(path))


def dump_job(job: RLHFJob) -> dict[str, Any]:
    """The job as a camelCase document (round-trips through parse_job)."""
    return job.model_dump(by_alias=True, mode="json", exclude_none=True)
