"""The RLHFJob CRD: generated from the JobSpec model, structural, and in agreement with it."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from rlhfless.api.crd import PHASES, PRINTER_COLUMNS, crd_yaml, generate_crd
from rlhfless.api.spec import SpecError, dump_job, parse_spec

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def openapi() -> dict[str, Any]:
    return generate_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def spec_schema() -> dict[str, Any]:
    return openapi()["properties"]["spec"]


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


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """The API server's defaulting: absent fields take their schema default, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, sub in schema["properties"].items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(out[name], sub)
        return out
    return value


def test_server_defaults_equal_the_model_defaults() -> None:
    defaulted = apply_defaults({}, spec_schema())
    model_defaults = dump_job(parse_spec({}))["spec"]
    assert parse_spec(defaulted).spec == parse_spec({}).spec
    # Every default the model fills is one the server fills (except the derived advantage).
    model_defaults["algorithm"].pop("advantage")
    assert defaulted == model_defaults


def _draft4(schema: Any) -> Any:
    """OpenAPI `nullable` as JSON-schema draft 4 (the rest is already draft-4 compatible)."""
    if isinstance(schema, list):
        return [_draft4(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _draft4(v) for k, v in schema.items() if not k.startswith("x-")}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _draft4(v) for k, v in schema["properties"].items()}
    if out.pop("nullable", False):
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def _cel_rules(schema: dict[str, Any], value: Any, path: str = "spec"):
    """(path, rule, self) for each x-kubernetes-validations rule that applies to `value`."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule, value
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                yield from _cel_rules(sub, value[name], f"{path}.{name}")


@functools.cache
def _cel_program(rule: str) -> Any:
    celpy = pytest.importorskip("celpy", reason="cel-python evaluates the CRD's CEL rules")
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_failures(spec: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    celpy = pytest.importorskip("celpy", reason="cel-python evaluates the CRD's CEL rules")
    old_values = dict((p, v) for p, _, v in _cel_rules(spec_schema(), old)) if old else {}
    failures = []
    for path, rule, value in _cel_rules(spec_schema(), spec):
        is_transition = "oldSelf" in rule["rule"]
        if is_transition and path not in old_values:
            continue  # transition rules only run on updates, with both values present
        activation = {"self": celpy.json_to_cel(value)}
        if is_transition:
            activation["oldSelf"] = celpy.json_to_cel(old_values[path])
        if not _cel_program(rule["rule"]).evaluate(activation):
            failures.append(f"{path}: {rule['message']}")
    return failures


def server_admits(spec: dict[str, Any]) -> list[str]:
    """Why the API server (schema, then CEL on the defaulted object) would refuse `spec`."""
    validator = jsonschema.Draft4Validator(_draft4(spec_schema()))
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(spec)]
    return errors or cel_failures(apply_defaults(spec, spec_schema()))


VALID = [
    {},
    {"algorithm": {"name": "ppo"}},
    {"algorithm": {"name": "ppo", "advantage": "gae"}, "resources": {"learner": {"gpus": 2}}},
    {"algorithm": {"name": "grpo", "advantage": "drgrpo"}, "steps": 3, "suspend": True},
    {"model": {"source": "gguf", "path": "smollm2"}, "generation": {"maxNewTokens": 2000}},
    {"model": {"tiny": {"nEmbd": 30, "nHead": 3}}, "scheduling": {"actors": 4, "maxActors": 4}},
    {"dataset": {"kind": "jsonl", "path": "/data/gsm8k.jsonl"}, "reward": {"args": {"tol": 0.01}}},
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
    {"trainer": {"zeroStage": 1}},
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
