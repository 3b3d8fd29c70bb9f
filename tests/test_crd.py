"""The RLHFJob CRD: generated from the JobSpec model, structural, and in agreement with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from crd_schema import apply_defaults, cel_failures, openapi, server_admits, spec_schema

from rlhfless.api.crd import PHASES, PRINTER_COLUMNS, crd_yaml, generate_crd
from rlhfless.api.names import JOB_NAME_PATTERN, MAX_JOB_NAME
from rlhfless.api.spec import SpecError, dump_job, parse_spec

REPO = Path(__file__).resolve().parents[1]


def test_checked_in_crd_matches_the_spec_model() -> None:
    on_disk = (REPO / "crds" / "rlhfjob.yaml").read_text()
    assert on_disk == crd_yaml(), "crds/rlhfjob.yaml is stale: run `rlhfless crd > " \
                                  "crds/rlhfjob.yaml`"
    assert yaml.safe_load(on_disk) == generate_crd()


def test_names_version_subresource_and_columns() -> None:
    crd = generate_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "rlhfjobs.rlhfless.io"
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == (
        "rlhfless.io", "Namespaced", "RLHFJob")
    assert "rj" in spec["names"]["shortNames"]
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {c["name"]: c["jsonPath"] for c in PRINTER_COLUMNS}
    assert {".status.phase", ".status.step", ".status.reward", ".status.costGpuSeconds",
            ".metadata.creationTimestamp"} <= set(columns.values())


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for name, child in (node.get("properties") or {}).items():
            out += _walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural() -> None:
    """What the API server requires of a v1 CRD schema (apiextensions structural rules)."""
    for path, node in _walk(openapi()):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        for banned in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "const"):
            assert banned not in node, f"{path}: {banned}"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("default", "absent") is not None, f"{path}: null default"
        for flag in ("exclusiveMinimum", "exclusiveMaximum"):
            if flag in node:
                assert node[flag] is True, f"{path}: OpenAPI v3.0 wants a boolean {flag}"
                assert ("minimum" if flag == "exclusiveMinimum" else "maximum") in node
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert path == ".spec.reward.args", f"{path}: only reward args are free-form"
    conditions = openapi()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["items"]["required"] == ["type", "status"]


def test_the_name_rule_is_the_one_of_api_names() -> None:
    assert openapi()["properties"]["metadata"] == {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": MAX_JOB_NAME,
                                "pattern": JOB_NAME_PATTERN}},
    }


def test_status_schema_has_what_the_operator_reports() -> None:
    status = openapi()["properties"]["status"]["properties"]
    assert {"phase", "step", "reward", "costGpuSeconds", "conditions", "observedGeneration",
            "checkpoint", "weightsVersion"} <= set(status)
    assert status["phase"]["enum"] == list(PHASES)
    fields = set(status["conditions"]["items"]["properties"])
    assert fields == {"type", "status", "reason", "message", "lastTransitionTime",
                      "observedGeneration"}


def test_enums_ranges_and_defaults_come_from_the_model() -> None:
    props = spec_schema()["properties"]
    algo = props["algorithm"]["properties"]
    assert algo["name"]["enum"] == ["grpo", "ppo"] and algo["name"]["default"] == "grpo"
    assert algo["clipEps"] == {**algo["clipEps"], "minimum": 0, "exclusiveMinimum": True,
                               "maximum": 1, "exclusiveMaximum": True, "type": "number"}
    assert algo["advantage"]["nullable"] is True and "default" not in algo["advantage"]
    assert props["trainer"]["properties"]["zeroStage"]["enum"] == [0, 2, 3]
    assert props["steps"]["minimum"] == 1 and props["steps"]["default"] == 10
    assert props["suspend"] == {**props["suspend"], "type": "boolean", "default": False}
    # Sub-objects default too, so the server fills nested defaults of an empty spec.
    assert props["resources"]["properties"]["reward"]["default"] == {"gpus": 0}
    assert props["resources"]["properties"]["actor"]["default"] == {}


def test_server_defaults_equal_the_model_defaults() -> None:
    defaulted = apply_defaults({}, spec_schema())
    model_defaults = dump_job(parse_spec({}))["spec"]
    assert parse_spec(defaulted).spec == parse_spec({}).spec
    # Every default the model fills is one the server fills (except the derived advantage).
    model_defaults["algorithm"].pop("advantage")
    assert defaulted == model_defaults


VALID = [
    {},
    {"algorithm": {"name": "ppo"}},
    {"algorithm": {"name": "ppo", "advantage": "gae"}, "resources": {"learner": {"gpus": 2}}},
    {"algorithm": {"name": "grpo", "advantage": "drgrpo"}, "steps": 3, "suspend": True},
    {"model": {"source": "gguf", "path": "smollm2"}, "generation": {"maxNewTokens": 2000}},
    {"model": {"tiny": {"nEmbd": 30, "nHead": 3}}, "scheduling": {"actors": 4, "maxActors": 4}},
    {"dataset": {"kind": "jsonl", "path": "/data/gsm8k.jsonl"}, "reward": {"args": {"tol": 0.01}}},
    # Edges of the rules both sides must accept alike.
    {"resources": {"actor": {"cpu": "500m", "memory": "1.5Gi"}, "reward": {"cpu": "0.25"}}},
    {"resources": {"driver": {"cpu": "1500m", "memory": "12Gi"}}},
    {"algorithm": {"klBeta": 10, "entropyCoef": 0}, "seed": 2**63 - 1},
    {"trainer": {"backend": "deepspeed", "zeroStage": 2}},
    {"resources": {"learner": {"gpus": 8}}, "trainer": {"cpuOffload": True,
                                                        "gradCheckpointing": True}},
    {"model": {"source": "gguf", "path": "/models", "ggufFile": "m.gguf", "dtype": "bfloat16"}},
    {"scheduling": {"keepAliveS": 30, "maxActors": None}, "generation": {"temperature": 1}},
    {"algorithm": {"groupSize": 4, "miniBatchSize": 8}, "dataset": {"promptsPerStep": 6}},
    {"dataset": {"kind": "parquet", "path": "/data/train.parquet",
                 "fields": {"prompt": "question", "answer": "meta.gold"}},
     "reward": {"name": "math", "workers": 4}, "logging": {"backends": ["mlflow", "wandb"]}},
    {"dataset": {"kind": "hf-disk", "path": "/data/ds", "split": "test"}},
]
# Rejected by the model; each is also refused by the server (schema or CEL) before the
# operator sees it. (Unknown reward names and unknown fields are the operator's to report.)
INVALID = [
    {"algorithm": {"name": "dpo"}},
    {"algorithm": {"clipEps": 0}},
    {"algorithm": {"clipEps": 1}},
    {"algorithm": {"name": "ppo", "advantage": "grpo"}},
    {"algorithm": {"advantage": "gae"}},
    {"steps": 0},
    {"scheduling": {"actors": 8, "maxActors": 2}},
    {"scheduling": {"lam": 1.5}},
    {"model": {"source": "hf"}},
    {"model": {"source": "gguf", "path": ""}},
    {"model": {"tiny": {"nEmbd": 30, "nHead": 4}}},
    {"resources": {"actor": {"gpus": -1}}},
    {"generation": {"topP": 0}},
    {"generation": {"maxNewTokens": 600}},
    {"dataset": {"kind": "jsonl"}},
    {"dataset": {"kind": "parquet"}},
    {"dataset": {"kind": "hf-disk", "path": ""}},
    {"dataset": {"kind": "csv", "path": "/data/x.csv"}},
    {"logging": {"backends": ["tensorboard"]}},
    {"reward": {"workers": 0}},
    {"trainer": {"zeroStage": 1}},
    {"trainer": {"backend": "deepspeed", "zeroStage": 3}, "resources": {"learner": {"gpus": 2}}},
    {"trainer": {"cpuOffload": True}},
    {"suspend": "maybe"},
    {"steps": "ten"},
]


def examples() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()).get("spec") or {}
            for p in sorted((REPO / "examples").glob("*.yaml"))]


@pytest.mark.parametrize("spec", VALID + examples())
def test_the_server_admits_what_the_model_accepts(spec: dict[str, Any]) -> None:
    parse_spec(spec)
    assert server_admits(spec) == []


@pytest.mark.parametrize("spec", INVALID)
def test_the_server_refuses_what_the_model_rejects(spec: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        parse_spec(spec)
    assert server_admits(spec), f"the CRD admits {spec}"


def test_model_and_algorithm_are_immutable() -> None:
    base = apply_defaults({"model": {"source": "tiny"}}, spec_schema())
    assert cel_failures(base, old=base) == []
    bigger = apply_defaults({"model": {"tiny": {"nLayer": 4}}}, spec_schema())
    assert cel_failures(bigger, old=base) == ["spec.model: model is immutable; create a new "
                                              "RLHFJob"]
    ppo = apply_defaults({"algorithm": {"name": "ppo"}}, spec_schema())
    assert any("algorithm.name is immutable" in f for f in cel_failures(ppo, old=base))
    # Mutable fields stay mutable: more steps, suspend, another learning rate.
    changed = apply_defaults({"steps": 99, "suspend": True, "algorithm": {"lr": 0.1}},
                             spec_schema())
    assert cel_failures(changed, old=base) == []
