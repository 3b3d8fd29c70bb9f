"""Every pod this project makes passes Pod Security "restricted": the functions and driver
of `rlhfless manifests`, and the operator of `helm template`; plus the objects a job gets
(the driver Job, its Secret, NetworkPolicy and RBAC) are valid Kubernetes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_chart import NON_DEFAULT_VALUES, render
from pod_security import hardening_gaps, pod_specs, restricted_violations
from typer.testing import CliRunner

from rlhfless.cli import app

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
KUBE_VERSIONS = ("1.25", "1.37")


def manifests(example: Path, *extra: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(app, ["manifests", str(example), "--namespace", "ml", *extra])
    assert result.exit_code == 0, result.output
    return list(yaml.safe_load_all(result.output))


def test_tiny_grpo_prints_the_driver_job_secret_network_policy_and_services() -> None:
    docs = manifests(Path(__file__).resolve().parents[1] / "examples" / "tiny-grpo.yaml")
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert kinds == [
        ("Secret", "tiny-grpo-token"), ("NetworkPolicy", "tiny-grpo-functions"),
        ("ServiceAccount", "tiny-grpo-driver"), ("Role", "tiny-grpo-driver"),
        ("RoleBinding", "tiny-grpo-driver"), ("ConfigMap", "tiny-grpo-progress"),
        ("Service", "tiny-grpo-actor"), ("Service", "tiny-grpo-reward"),
        ("Service", "tiny-grpo-learner"), ("Job", "tiny-grpo-driver")]
    token = docs[0]["stringData"]["token"]
    assert len(token) >= 40  # a fresh random one per render
    assert manifests(EXAMPLES[0])[0]["stringData"]["token"] != token


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_every_generated_pod_is_restricted(example: Path) -> None:
    pods = [(name, spec) for doc in manifests(example) for name, spec in pod_specs(doc)]
    assert {name.split("/")[0] for name, _ in pods} == {"Service", "Job"}
    for name, spec in pods:
        assert restricted_violations(spec) == [], name
        # Only the driver calls the API; functions get no token at all.
        assert hardening_gaps(spec, needs_api=name.startswith("Job/")) == [], name


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_generated_core_objects_are_valid_kubernetes(example: Path) -> None:
    for doc in manifests(example):
        if doc["kind"] == "Service" and doc["apiVersion"].startswith("serving.knative"):
            continue  # a custom resource: test_manifests checks it against Knative's CRD
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("values", [{}, NON_DEFAULT_VALUES], ids=["default", "non-default"])
def test_the_chart_pods_are_restricted(values: dict[str, Any]) -> None:
    pods = [(name, spec) for doc in render(values) for name, spec in pod_specs(doc)]
    assert pods
    for name, spec in pods:
        assert restricted_violations(spec) == [], name
        assert hardening_gaps(spec, needs_api=True) == [], name  # the operator calls the API


COMPLIANT: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    "automountServiceAccountToken": False,
    "containers": [{"name": "c", "securityContext": {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}}}],
    "volumes": [{"name": "v", "emptyDir": {}}],
}


def _mutated(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(COMPLIANT)
    *parents, leaf = path.split(".")
    node: Any = spec
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return spec


@pytest.mark.parametrize("path,value,needle", [
    ("hostNetwork", True, "host namespaces"),
    ("volumes", [{"name": "h", "hostPath": {"path": "/"}}], "hostPath"),
    ("volumes", [{"name": "g", "gitRepo": {"repository": "x"}}], "volume types"),
    ("containers.0.securityContext.privileged", True, "privileged"),
    ("containers.0.securityContext.allowPrivilegeEscalation", None, "privilege escalation"),
    ("containers.0.securityContext.capabilities", {"drop": ["NET_RAW"]}, "must drop ALL"),
    ("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]},
     "adds ['SYS_ADMIN']"),
    ("securityContext.runAsNonRoot", None, "runAsNonRoot"),
    ("containers.0.securityContext.runAsNonRoot", False, "runAsNonRoot"),
    ("securityContext.runAsUser", 0, "runAsUser must not be 0"),
    ("securityContext.seccompProfile", {"type": "Unconfined"}, "Unconfined"),
    ("securityContext.seccompProfile", None, "seccompProfile RuntimeDefault"),
    ("containers.0.ports", [{"containerPort": 80, "hostPort": 80}], "hostPort"),
    ("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}], "sysctls"),
    ("containers.0.securityContext.seLinuxOptions", {"type": "spc_t"}, "SELinux"),
    ("containers.0.securityContext.procMount", "Unmasked", "procMount"),
])
def test_the_checker_catches_each_control(path: str, value: Any, needle: str) -> None:
    assert restricted_violations(COMPLIANT) == []
    errors = restricted_violations(_mutated(path, value))
    assert any(needle in e for e in errors), errors


def test_the_hardening_checks_catch_a_writable_root_and_a_token() -> None:
    assert hardening_gaps(COMPLIANT, needs_api=False) == []
    writable = _mutated("containers.0.securityContext.readOnlyRootFilesystem", None)
    assert hardening_gaps(writable, needs_api=True) == [
        "containers[0]: readOnlyRootFilesystem must be true"]
    token = _mutated("automountServiceAccountToken", None)
    assert hardening_gaps(token, needs_api=True) == []
    assert hardening_gaps(token, needs_api=False)
