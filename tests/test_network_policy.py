"""A job's NetworkPolicy, evaluated as Kubernetes does: its functions take traffic from that
job's driver pod (port 8080, the pod-addressed hand-off calls) and from the platform's
namespaces (Knative's activator), and from nothing else — not another job's driver, not
another pod of the namespace, not the same driver on another port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from rlhfless.cli import app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-grpo.yaml"


def _objects(name: str, tmp_path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    job = tmp_path / f"{name}.yaml"
    job.write_text(EXAMPLE.read_text().replace("name: tiny-grpo", f"name: {name}", 1))
    result = CliRunner().invoke(app, ["manifests", str(job), "--namespace", "ml"])
    assert result.exit_code == 0, result.output
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.output)}


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr  # the only operator these policies use
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def admits(policy: dict[str, Any], policy_ns: str, target: dict[str, str], source: dict[str, str],
           source_ns: dict[str, str], port: int) -> bool:
    """Whether `policy` (in namespace `policy_ns`) lets a pod labelled `source`, in a
    namespace labelled `source_ns`, reach a pod labelled `target` on TCP `port`."""
    spec = policy["spec"]
    if not _matches(spec["podSelector"], target) or "Ingress" not in spec["policyTypes"]:
        return True  # not selected: this policy says nothing about it
    for rule in spec.get("ingress", []):
        ports = rule.get("ports")
        if ports and not any(p.get("protocol", "TCP") == "TCP" and p["port"] == port
                             for p in ports):
            continue
        for peer in rule.get("from", []):
            pods, namespaces = peer.get("podSelector"), peer.get("namespaceSelector")
            ns_ok = (_matches(namespaces, source_ns) if namespaces is not None
                     else source_ns.get("kubernetes.io/metadata.name") == policy_ns)
            if ns_ok and (pods is None or _matches(pods, source)):
                return True
    return False


def _pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"]["labels"]


def test_only_the_jobs_driver_and_the_platform_reach_its_functions(tmp_path: Path) -> None:
    mine, theirs = _objects("alpha", tmp_path), _objects("beta", tmp_path)
    policy = mine[("NetworkPolicy", "alpha-functions")]
    ml = {"kubernetes.io/metadata.name": "ml"}
    knative = {"kubernetes.io/metadata.name": "knative-serving"}
    driver = _pod_labels(mine[("Job", "alpha-driver")])
    other_driver = _pod_labels(theirs[("Job", "beta-driver")])
    other_function = _pod_labels(theirs[("Service", "beta-actor")])
    for stage in ("actor", "reward", "learner"):
        target = _pod_labels(mine[("Service", f"alpha-{stage}")])
        assert admits(policy, "ml", target, driver, ml, 8080), stage
        assert not admits(policy, "ml", target, driver, ml, 9090), stage  # only 8080
        assert not admits(policy, "ml", target, other_driver, ml, 8080), stage
        assert not admits(policy, "ml", target, other_function, ml, 8080), stage
        assert not admits(policy, "ml", target, {}, ml, 8080), stage  # any other pod
        # A pod labelled as this job's driver in another namespace is not this driver.
        assert not admits(policy, "ml", target, driver,
                          {"kubernetes.io/metadata.name": "elsewhere"}, 8080), stage
        assert admits(policy, "ml", target, {"app": "activator"}, knative, 8012), stage
    # The other job's functions are not this policy's business (their own policy rules).
    assert admits(policy, "ml", other_function, other_driver, ml, 8080)
    their_policy = theirs[("NetworkPolicy", "beta-functions")]
    assert not admits(their_policy, "ml", other_function, driver, ml, 8080)
