"""The RLHFJob CustomResourceDefinition, generated from the JobSpec model.

One source of truth: the pydantic models in `spec.py` give every field, type, default, enum
and range; this module turns their JSON schema into a *structural* OpenAPI v3 schema (refs
inlined, `Optional` as `nullable`, no `additionalProperties: false` next to `properties`) and
adds what only the API server can enforce: CEL rules for immutable and cross-field
constraints, the status subresource and the printer columns. `crds/rlhfjob.yaml` is this
module's output, checked for drift by the tests.
"""

from __future__ import annotations

import copy
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from rlhfless.api.names import JOB_NAME_PATTERN, MAX_JOB_NAME
from rlhfless.api.spec import API_GROUP, GPU_TYPE_PATTERN, KIND, JobSpec
from rlhfless.api.stages import STAGE_NAMES

VERSION = "v1alpha1"
PLURAL = "rlhfjobs"
SINGULAR = "rlhfjob"
SHORT_NAMES = ["rj"]
CATEGORIES = ["rlhfless"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"

Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
PHASES: tuple[str, ...] = typing.get_args(Phase)


class _StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(_StatusModel):
    """A standard Kubernetes condition (metav1.Condition shape)."""

    type: str = Field(..., min_length=1, max_length=316, description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="Condition status.")
    reason: str | None = Field(None, max_length=1024, description="CamelCase reason.")
    message: str | None = Field(None, max_length=32768, description="Human-readable detail.")
    last_transition_time: str | None = Field(
        None,
        json_schema_extra={"format": "date-time"},
        description="When the status last changed.",
    )
    observed_generation: int | None = Field(
        None, ge=0, description="The .metadata.generation the condition was set for."
    )


class StageCostStatus(_StatusModel):
    gpu_seconds: float = Field(..., ge=0, description="GPU-seconds billed to the stage.")
    dollars: float | None = Field(
        None, ge=0, description="Dollars (absent: no price for the stage's GPU type)."
    )


class CostStatus(_StatusModel):
    """What the job cost so far (rlhfless.cost.cost_status over the recorded steps)."""

    gpu_seconds: float = Field(..., ge=0, description="GPU-seconds billed (GPUs x seconds "
                               "alive, cold start and keep-alive included).")
    dollars: float | None = Field(
        None, ge=0, description="Dollars (absent: a GPU type of the job has no price)."
    )
    stages: dict[str, StageCostStatus] | None = Field(None, description="Per stage.")
    serverful_gpu_seconds: float | None = Field(
        None, ge=0, description="GPU-seconds a serverful layout would have held on the same "
        "timings (every stage's GPUs for the whole step)."
    )
    serverful_dollars: float | None = Field(None, ge=0, description="The same in dollars.")
    next_step_gpu_seconds: float | None = Field(
        None, ge=0, description="Predicted GPU-seconds of the next step (budget check)."
    )
    next_step_dollars: float | None = Field(
        None, ge=0, description="Predicted dollars of the next step (budget check)."
    )


class JobStatus(_StatusModel):
    """What the operator reports; written only through the status subresource."""

    phase: Phase | None = Field(None, description="Lifecycle phase.")
    step: int | None = Field(None, ge=0, description="RL steps completed.")
    reward: float | None = Field(None, description="Mean reward of the last step.")
    cost_gpu_seconds: float | None = Field(
        None, ge=0, description="GPU-seconds billed so far (GPUs x seconds alive)."
    )
    cost: CostStatus | None = Field(None, description="Cost so far, per stage, and the "
                                    "serverful comparison.")
    weights_version: int | None = Field(None, ge=0, description="Current weights version.")
    checkpoint: str | None = Field(None, description="Checkpoint of the last recorded step.")
    observed_generation: int | None = Field(
        None, ge=0, description="The .metadata.generation the status reflects."
    )
    conditions: list[Condition] | None = Field(None, description="Standard conditions.")


# -- pydantic JSON schema -> structural OpenAPI v3 ---------------------------------------

def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve `$ref`s, turn `anyOf [X, null]` into nullable X, drop what K8s rejects."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = _inline(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        siblings = _inline({k: v for k, v in node.items() if k != "$ref"}, defs)
        return {**target, **siblings}
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        if len(options) != 1:
            raise ValueError(f"only Optional[X] unions map to a structural schema: {node}")
        merged = {**_inline(options[0], defs), "nullable": True}
        rest = _inline({k: v for k, v in node.items() if k != "anyOf"}, defs)
        return {**merged, **rest}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs", "propertyNames"):
            continue  # no propertyNames in structural schemas: map keys are checked by CEL
        if key == "default" and value is None:
            continue  # "absent" already means None
        if key == "additionalProperties":
            # Structural schemas forbid additionalProperties beside properties (unknown fields
            # are pruned); a free-form map keeps its content via preserve-unknown-fields.
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out[key] = _inline(value, defs)
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True  # OpenAPI 3.0 spells exclusivity as a flag on the bound
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key == "properties":
            out[key] = {name: _inline(prop, defs) for name, prop in value.items()}
            continue
        out[key] = _inline(value, defs)
    return out


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _apply_factory_defaults(model: type[BaseModel], node: dict[str, Any]) -> None:
    """Give every sub-object a default so the API server fills nested defaults too.

    pydantic leaves `default_factory` fields without a schema default; a structural schema
    only defaults a nested field once its parent object exists, so each sub-object defaults
    to its factory's non-default values (`{}` mostly, `{gpus: 0}` for the reward stage).
    """
    for name, field in model.model_fields.items():
        prop = node["properties"][field.alias or name]
        sub = _nested_model(field.annotation)
        if field.default_factory is not None and "default" not in prop:
            if sub is not None and field.default_factory is sub:
                prop["default"] = {}
            else:
                value = field.default_factory()  # type: ignore[call-arg]
                prop["default"] = (
                    value.model_dump(by_alias=True, mode="json", exclude_defaults=True)
                    if isinstance(value, BaseModel) else value
                )
        if sub is not None and prop.get("type") == "object" and "properties" in prop:
            _apply_factory_defaults(sub, prop)


_KEY_ORDER = ("description", "type", "format", "nullable", "enum", "default", "minimum",
              "exclusiveMinimum", "maximum", "exclusiveMaximum", "minLength", "maxLength",
              "pattern", "required", "properties", "items")


def _ordered(node: Any) -> Any:
    """Readable, stable key order: what a field is first, its children last."""
    if isinstance(node, list):
        return [_ordered(item) for item in node]
    if not isinstance(node, dict):
        return node
    rank = {key: i for i, key in enumerate(_KEY_ORDER)}
    keys = sorted(node, key=lambda k: (rank.get(k, len(rank)), k))
    if "properties" in node and all(isinstance(v, dict) for v in node["properties"].values()):
        return {k: ({n: _ordered(p) for n, p in node[k].items()} if k == "properties"
                    else _ordered(node[k])) for k in keys}
    return {k: _ordered(node[k]) for k in keys}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema = _inline(raw, raw.get("$defs", {}))
    _apply_factory_defaults(model, schema)
    return _ordered(schema)


# -- what only the API server can check ------------------------------------------------

def _rule(rule: str, message: str, **extra: str) -> dict[str, str]:
    return {"rule": rule, "message": message, **extra}


# Cross-field rules mirror the model validators in spec.py (the operator re-checks with
# pydantic, so a cluster without CEL still rejects these jobs, only later and in .status).
# Null values count as absent in Kubernetes CEL, so `has()` covers Optional fields.
# Each message starts with the field it blames, relative to the rule's node.
_CEL_RULES: dict[tuple[str, ...], list[dict[str, str]]] = {
    (): [
        _rule(
            "self.model.source != 'tiny' || "
            "self.generation.maxNewTokens < self.model.tiny.nPositions",
            "generation.maxNewTokens must be below model.tiny.nPositions",
        ),
        _rule(
            "(self.dataset.promptsPerStep * self.algorithm.groupSize) "
            "% self.algorithm.miniBatchSize == 0",
            "algorithm.miniBatchSize must divide the batch "
            "(dataset.promptsPerStep × algorithm.groupSize)",
        ),
        _rule("self.resources.learner.gpus <= 1 || self.trainer.backend == 'torch'",
              "trainer.backend must be 'torch' when resources.learner.gpus > 1 (FSDP2 ranks)"),
        _rule("!self.trainer.cpuOffload || self.resources.learner.gpus > 1",
              "trainer.cpuOffload needs resources.learner.gpus > 1"),
    ],
    ("model",): [
        _rule("self == oldSelf", "model is immutable; create a new RLHFJob"),
        _rule(
            "self.source == 'tiny' || (has(self.path) && self.path != '')",
            "path is required when source is 'hf' or 'gguf'",
        ),
        _rule("self.source != 'tiny' || !has(self.path)",
              "path is only read when source is 'hf' or 'gguf'"),
        _rule(
            "!has(self.ggufFile) || "
            "(self.source == 'gguf' && (!has(self.path) || self.path != 'smollm2'))",
            "ggufFile is only read when source is 'gguf' and path is a directory",
        ),
        _rule("self.source != 'tiny' || self.dtype == 'float32'",
              "dtype of a tiny model is float32"),
    ],
    ("model", "tiny"): [
        _rule("self.nEmbd % self.nHead == 0", "nEmbd must be divisible by nHead"),
    ],
    ("algorithm",): [
        _rule(
            "!has(self.advantage) || (self.name == 'ppo') == (self.advantage == 'gae')",
            "advantage must be 'gae' for ppo, 'grpo' or 'drgrpo' for grpo",
        ),
    ],
    ("algorithm", "name"): [
        _rule("self == oldSelf", "algorithm.name is immutable; create a new RLHFJob"),
    ],
    ("dataset",): [
        _rule(
            "self.kind in ['arithmetic', 'repeat'] || (has(self.path) && self.path != '')",
            "path is required when kind is 'parquet', 'jsonl' or 'hf-disk'",
        ),
        _rule("!(self.kind in ['arithmetic', 'repeat']) || !has(self.path)",
              "path is only read when kind is 'parquet', 'jsonl' or 'hf-disk'"),
    ],
    ("reward",): [
        _rule("self.name != 'reward_model' || has(self.model)",
              "model is required when name is 'reward_model'"),
        _rule("self.name == 'reward_model' || !has(self.model)",
              "model is only read when name is 'reward_model'"),
    ],
    ("scheduling",): [
        _rule("self.actors <= self.maxActors", "actors must not exceed maxActors"),
    ],
    ("trainer",): [
        _rule("self.backend == 'deepspeed' || self.zeroStage == 0",
              "zeroStage needs backend 'deepspeed'"),
    ],
    ("cost",): [
        _rule("!has(self.stageGpuTypes) || self.stageGpuTypes.all(k, k in ["
              + ", ".join(f"'{n}'" for n in STAGE_NAMES) + "])",
              "stageGpuTypes keys must be stage names: " + ", ".join(STAGE_NAMES)),
        _rule(f"!has(self.prices) || self.prices.all(k, k.matches('{GPU_TYPE_PATTERN}'))",
              "prices keys must be GPU type names (letters, digits, '.', '_', '-')"),
    ],
}


def _at(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = schema
    for key in path:
        node = node["properties"][key]
    return node


def spec_schema() -> dict[str, Any]:
    schema = structural_schema(JobSpec)
    for path, rules in _CEL_RULES.items():
        _at(schema, path).setdefault("x-kubernetes-validations", []).extend(copy.deepcopy(rules))
    return schema


def status_schema() -> dict[str, Any]:
    schema = structural_schema(JobStatus)
    conditions = schema["properties"]["conditions"]
    # One entry per type, merged by key (kubectl/server-side apply and `kubectl wait`).
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions.pop("nullable", None)  # list-map keys may not sit under a nullable list
    return schema


def metadata_schema() -> dict[str, Any]:
    """The job name rule (rlhfless.api.names): the one metadata check a CRD may carry."""
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": MAX_JOB_NAME, "pattern": JOB_NAME_PATTERN},
        },
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
    {"name": "Steps", "type": "integer", "jsonPath": ".spec.steps", "priority": 1},
    {"name": "Reward", "type": "number", "jsonPath": ".status.reward"},
    {"name": "Cost GPU-s", "type": "number", "jsonPath": ".status.costGpuSeconds"},
    {"name": "Cost $", "type": "number", "jsonPath": ".status.cost.dollars"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def generate_crd() -> dict[str, Any]:
    """The CustomResourceDefinition manifest as a dict (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "rlhfless"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {
                        "openAPIV3Schema": {
                            "description": "A synchronous RLHF (GRPO/PPO) training job run on "
                            "serverless stage functions.",
                            "type": "object",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": metadata_schema(),
                                "spec": {**spec_schema(), "default": {}},
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = (
    "# Generated by `rlhfless crd` from rlhfless/api/spec.py (rlhfless.api.crd); do not edit.\n"
)


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(generate_crd(), sort_keys=False, width=100, allow_unicode=True)
