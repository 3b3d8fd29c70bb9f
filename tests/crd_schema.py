"""What the API server would do with an RLHFJob, emulated offline from the generated CRD.

In the server's order: route by apiVersion/kind, refuse unknown fields (kubectl's default
strict field validation), prune nulls of non-nullable fields, apply schema defaults,
validate against the openAPIV3Schema (JSON-schema Draft 4, patterns in RE2 as Go matches
them), then run the CEL rules (`x-kubernetes-validations`, with cel-python) on the defaulted
object. Each refusal is "field.path: message"; a CEL message starting with a field below its
rule's node (e.g. "algorithm.miniBatchSize must divide ...") is reported at that field.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from jsonschema import ValidationError, validators

from rlhfless.api.crd import PLURAL, generate_crd
from rlhfless.api.spec import API_VERSION, KIND


@functools.cache
def openapi() -> dict[str, Any]:
    return generate_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def spec_schema() -> dict[str, Any]:
    return openapi()["properties"]["spec"]


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """The API server's defaulting: nulls of non-nullable fields are pruned, then absent
    fields take their schema default, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        out = {k: v for k, v in value.items()
               if not (v is None and k in schema["properties"]
                       and not schema["properties"][k].get("nullable"))}
        for name, sub in schema["properties"].items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(out[name], sub)
        return out
    return value


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


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    """`pattern` as the API server applies it: Go's RE2, where `$` is the end of the text
    (Python's `re` also lets `$` match before a final newline)."""
    re2 = pytest.importorskip("re2", reason="google-re2 (a cel-python dependency)")
    if validator.is_type(instance, "string") and not re2.search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = validators.extend(jsonschema.Draft4Validator, {"pattern": _re2_pattern})


def _cel_rules(schema: dict[str, Any], value: Any, path: str = "spec"):
    """(path, schema, rule, self) for each x-kubernetes-validations rule that applies."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, schema, rule, value
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                yield from _cel_rules(sub, value[name], f"{path}.{name}")


@functools.cache
def _cel_program(rule: str) -> Any:
    celpy = pytest.importorskip("celpy", reason="cel-python evaluates the CRD's CEL rules")
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _without_nulls(value: Any) -> Any:
    """Null fields count as absent in Kubernetes CEL (`has()` is false)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _blamed(path: str, schema: dict[str, Any], message: str) -> str:
    """The field a CEL message starts with, when it names one below the rule's node."""
    first = message.split(" ", 1)[0]
    node = schema
    for part in first.split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return path
    return f"{path}.{first}"


def cel_failures(spec: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    celpy = pytest.importorskip("celpy", reason="cel-python evaluates the CRD's CEL rules")
    old_values = {p: v for p, _, _, v in _cel_rules(spec_schema(), old)} if old else {}
    failures = []
    for path, schema, rule, value in _cel_rules(spec_schema(), _without_nulls(spec)):
        is_transition = "oldSelf" in rule["rule"]
        if is_transition and path not in old_values:
            continue  # transition rules only run on updates, with both values present
        activation = {"self": celpy.json_to_cel(value)}
        if is_transition:
            activation["oldSelf"] = celpy.json_to_cel(old_values[path])
        if not _cel_program(rule["rule"]).evaluate(activation):
            failures.append(f"{_blamed(path, schema, rule['message'])}: {rule['message']}")
    return failures


def _schema_errors(value: Any, schema: dict[str, Any], prefix: str) -> list[str]:
    errors = []
    for e in _Validator(_draft4(schema)).iter_errors(value):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path)
        errors.append(f"{prefix}{where}: {e.message}")
    return errors


def server_admits(spec: dict[str, Any]) -> list[str]:
    """Why the API server (schema, then CEL on the defaulted object) would refuse `spec`."""
    defaulted = apply_defaults(spec, spec_schema())
    return _schema_errors(defaulted, spec_schema(), "spec") or cel_failures(defaulted)


def _unknown_fields(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """kubectl's default `--validate=strict`: the server refuses fields its schema lacks."""
    if not isinstance(value, dict) or "properties" not in schema:
        return []
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    errors = []
    for key, item in value.items():
        sub = schema["properties"].get(key)
        if sub is None:
            errors.append(f"{path}.{key}: unknown field")
        else:
            errors += _unknown_fields(item, sub, f"{path}.{key}")
    return errors


def server_refusals(document: Any) -> list[str]:
    """Why the API server would refuse to create this whole RLHFJob object (empty: stored)."""
    if not isinstance(document, dict):
        return ["(root): an object must be a JSON object"]
    routing = []
    if document.get("apiVersion") != API_VERSION:
        routing.append(f"apiVersion: no {PLURAL} served as {document.get('apiVersion')!r}")
    if document.get("kind") != KIND:
        routing.append(f"kind: {document.get('kind')!r} is not {KIND} (no such kind)")
    if routing:
        return routing
    spec = document.get("spec")
    unknown = _unknown_fields(spec, spec_schema(), "spec") if isinstance(spec, dict) else []
    if unknown:
        return unknown
    whole = {**document, "spec": apply_defaults(spec if spec is not None else {},
                                                spec_schema())}
    errors = _schema_errors(whole, openapi(), "")
    if errors:
        return [e.lstrip(".") for e in errors]
    return cel_failures(whole["spec"])
