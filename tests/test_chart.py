"""The Helm chart: lint, render, validate every object, and check the pieces fit together.

Rendering uses the real helm binary (scripts/fetch_helm.py). Core objects are validated
with kubernetes-validate's strict schemas for the oldest and newest Kubernetes the chart
supports; the Knative Services the operator builds from the chart's settings are validated
against Knative's own CRD schema and webhook rules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_chart import (
    CHART,
    NAMESPACE,
    NON_DEFAULT_VALUES,
    PROMETHEUS_OPERATOR_API,
    RELEASE,
    REPO,
    by_kind,
    lint,
    one,
    render,
)
from knative_webhook import check_webhook_rules

from rlhfless.api.crd import crd_yaml, generate_crd
from rlhfless.api.spec import load_job
from rlhfless.knative.services import build_services
from rlhfless.operator.config import OperatorConfig

KUBE_VERSIONS = ("1.25", "1.37")  # Chart.yaml kubeVersion floor, newest schema available
CUSTOM_KINDS = {"CustomResourceDefinition"}  # core, but validated against generate_crd too
PROMETHEUS_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
KNATIVE_CRD = REPO.parent / "shared" / "knative" / "service-crd.yaml"

VARIANTS = {
    "default": ({}, ()),
    "default+prometheus-operator": ({}, PROMETHEUS_OPERATOR_API),
    "non-default": (NON_DEFAULT_VALUES, PROMETHEUS_OPERATOR_API),
    "non-default-no-prometheus-operator": (NON_DEFAULT_VALUES, ()),
    "minimal": ({"crds": {"install": False}, "rbac": {"create": False},
                 "serviceAccount": {"create": False}, "weights": {"create": False},
                 "metrics": {"service": {"enabled": False}},
                 "dashboard": {"enabled": False}}, ()),
}


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


# -- helm itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("values", [{}, NON_DEFAULT_VALUES], ids=["default", "non-default"])
def test_helm_lint_strict_passes(values: dict[str, Any]) -> None:
    proc = lint(values)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("bad", [
    {"operator": {"metricsPort": "9090"}},  # wrong type
    {"operator": {"metricPort": 9090}},  # typo: unknown key
    {"weights": {"accessModes": ["ReadWriteEverywhere"]}},
    {"image": {"digest": "latest"}},
    {"operator": {"watchNamespace": "Not_A_Namespace"}},
    {"cost": {"prices": {"H100": {"onDemand": -1}}}},
    {"cost": {"prices": {"L4": {"spot": "cheap"}}}},
    {"cost": {"prices": {"L4": {"reserved": 0.2}}}},
    {"cost": {"pricing": "reserved"}},
], ids=["type", "unknown-key", "access-mode", "digest", "namespace", "negative-price",
        "price-word", "price-unknown-column", "pricing"])
def test_values_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    proc = lint(bad)
    assert proc.returncode != 0, f"helm lint accepted {bad}"
    assert "values don't meet the specifications of the schema" in proc.stdout + proc.stderr


def test_values_yaml_satisfies_its_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


def test_kube_version_floor_is_enforced() -> None:
    assert render(kube_version="1.25.0")
    with pytest.raises(AssertionError, match="kubeVersion|incompatible"):
        render(kube_version="1.24.0")


# -- every rendered object is valid --------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_core_objects_are_valid_kubernetes(variant: str) -> None:
    values, apis = VARIANTS[variant]
    docs = render(values, apis)
    assert docs
    for doc in docs:
        if doc["kind"] in PROMETHEUS_KINDS:
            continue  # not a core kind; checked field by field below
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{doc['kind']} {doc['metadata']['name']} invalid for "
                                     f"Kubernetes {version}: {exc}") from exc
        meta = doc["metadata"]
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_default_render_has_the_expected_objects() -> None:
    kinds = sorted(d["kind"] for d in render())
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                            "CustomResourceDefinition", "Deployment", "Service",
                            "PersistentVolumeClaim", "ConfigMap"])


def test_minimal_render_keeps_only_the_operator() -> None:
    values, apis = VARIANTS["minimal"]
    docs = render(values, apis)
    assert [d["kind"] for d in docs] == ["Deployment"]
    pod = docs[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "default"
    assert env_of(docs[0])["RLHFLESS_WEIGHTS_PVC"] == "rlhfless-weights"


# -- the CRD ---------------------------------------------------------------------------------

def test_chart_crd_copy_matches_the_generated_crd() -> None:
    """files/crds/rlhfjob.yaml is a plain copy (no symlink) of crds/rlhfjob.yaml, which is
    `rlhfless crd` output: all three must agree."""
    copy = CHART / "files" / "crds" / "rlhfjob.yaml"
    assert not copy.is_symlink()
    assert copy.read_text() == (REPO / "crds" / "rlhfjob.yaml").read_text(), (
        "run: cp crds/rlhfjob.yaml charts/rlhfless/files/crds/rlhfjob.yaml")
    assert copy.read_text() == crd_yaml()


def test_rendered_crd_is_the_generated_one_plus_release_metadata() -> None:
    crd = one(render(), "CustomResourceDefinition")
    generated = generate_crd()
    assert crd["spec"] == generated["spec"]  # types too: 1e-05 stays a float
    assert crd["metadata"]["name"] == generated["metadata"]["name"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert generated["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
    no_keep = one(render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "annotations" not in no_keep["metadata"]
    assert by_kind(render({"crds": {"install": False}}), "CustomResourceDefinition") == []


def test_crd_lives_in_templates_so_upgrades_apply_it() -> None:
    assert not (CHART / "crds").exists(), "charts/*/crds is install-only in helm"
    assert (CHART / "templates" / "crd-rlhfjob.yaml").exists()


# -- the operator Deployment -----------------------------------------------------------------

def test_operator_deployment_runs_one_kopf_replica_with_probes() -> None:
    dep = one(render(), "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/rlhfless/rlhfless:0.1.0"
    assert container["command"] == ["rlhfless"]
    assert container["args"] == ["operator", "--liveness", "http://0.0.0.0:8080/healthz",
                                 "--metrics-port", "9090"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    # non-root, read-only root filesystem, nothing extra
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # The operator mounts no job's data: only scratch space for its own caches.
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    assert [v for v in pod["volumes"] if "persistentVolumeClaim" in v] == []


@pytest.mark.parametrize("values", [{}, NON_DEFAULT_VALUES], ids=["default", "non-default"])
def test_operator_cli_accepts_the_deployment_arguments(values: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The args the chart passes parse with the real `rlhfless operator` command."""
    from typer.testing import CliRunner

    import rlhfless.operator.main as main
    from rlhfless.cli import app

    seen: dict[str, Any] = {}
    monkeypatch.setattr(main, "run_operator", lambda **kwargs: seen.update(kwargs))
    container = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    result = CliRunner().invoke(app, container["args"])
    assert result.exit_code == 0, result.output
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert seen["metrics_port"] == ports["metrics"]
    assert seen["liveness"] == f"http://0.0.0.0:{ports['healthz']}/healthz"
    assert seen["namespace"] == (values.get("operator", {}).get("watchNamespace") or None)
    assert main.operator_kwargs(seen["namespace"], seen["liveness"])["standalone"] is True


@pytest.mark.parametrize("values", [{}, NON_DEFAULT_VALUES], ids=["default", "non-default"])
def test_deployment_env_configures_the_operator(values: dict[str, Any]) -> None:
    """Every RLHFLESS_* variable the chart sets is read by OperatorConfig.from_env and
    lands where the values say."""
    dep = one(render(values), "Deployment")
    env = env_of(dep)
    read: set[str] = set()

    class Recording(dict):  # type: ignore[type-arg]
        def get(self, key: str, default: Any = None) -> Any:
            read.add(key)
            return super().get(key, default)

    config = OperatorConfig.from_env(Recording(env))
    ours = {k for k in env if k.startswith("RLHFLESS_")}
    assert ours <= read, f"set by the chart but never read: {ours - read}"
    v = NON_DEFAULT_VALUES if values else yaml.safe_load((CHART / "values.yaml").read_text())
    fn = v["functions"]
    weights = v["weights"]
    assert config.functions.weights_pvc == weights["claimName"]
    assert config.functions.data_mount == fn["dataMount"]
    assert config.functions.timeout_s == fn["timeoutSeconds"]
    assert list(config.functions.ingress_namespaces) == fn["ingressNamespaces"]
    assert config.functions.driver_grace_s == v["driver"]["terminationGracePeriodSeconds"]
    assert config.functions.meter_interval_s == v["driver"]["meterIntervalSeconds"]
    assert config.functions.models_subpath == v["driver"]["modelsSubPath"]
    assert config.progress_interval_s == v["operator"]["progressIntervalSeconds"]
    assert config.functions.progress_deadline_s == fn["progressDeadlineSeconds"]
    assert config.functions.allow_zero_initial_scale is fn["allowZeroInitialScale"]
    assert config.functions.image_pull_policy == (fn["imagePullPolicy"] or None)
    assert config.functions.service_account == (fn["serviceAccountName"] or None)
    assert config.max_retries == v["operator"]["maxRetries"]
    assert config.retry_backoff_s == v["operator"]["retryBackoffSeconds"]
    cost = v["cost"]
    assert (config.cost.gpu_type, config.cost.pricing) == (cost["gpuType"], cost["pricing"])
    for gpu, price in cost["prices"].items():  # helm merges these into the defaults' table
        assert price.items() <= config.cost.prices[gpu].model_dump(by_alias=True).items()


def test_function_images_come_from_the_values() -> None:
    default = OperatorConfig.from_env(env_of(one(render(), "Deployment"))).functions
    assert default.image == "ghcr.io/rlhfless/rlhfless:0.1.0"  # the operator's own image
    assert default.gpu_image == "ghcr.io/rlhfless/rlhfless:0.1.0-gpu"
    custom = OperatorConfig.from_env(env_of(one(render(NON_DEFAULT_VALUES),
                                                "Deployment"))).functions
    assert custom.image == "registry.example.com/ml/rlhfless-fn@sha256:" + "cd" * 32
    assert custom.gpu_image == "registry.example.com/ml/rlhfless-fn:0.1.0-cuda13"
    # An operator pinned by digest: CPU functions run that very image.
    pinned = {"image": {"digest": "sha256:" + "ef" * 32}}
    same = OperatorConfig.from_env(env_of(one(render(pinned), "Deployment"))).functions
    assert same.image == "ghcr.io/rlhfless/rlhfless@sha256:" + "ef" * 32
    assert same.gpu_image == "ghcr.io/rlhfless/rlhfless:0.1.0-gpu"


def test_non_default_values_reach_the_deployment() -> None:
    dep = one(render(NON_DEFAULT_VALUES, PROMETHEUS_OPERATOR_API), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert dep["metadata"]["name"] == "rlhf-operator"
    assert container["image"] == "registry.example.com/ml/rlhfless@sha256:" + "ab" * 32
    assert container["imagePullPolicy"] == "Always"
    assert container["args"][-2:] == ["--namespace", "ml-team"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["priorityClassName"] == "ml-high"
    assert pod["serviceAccountName"] == "rlhf-sa"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "ml"
    assert dep["spec"]["template"]["metadata"]["annotations"] == {"example.com/team": "ml"}
    assert {"name": "LOG_FORMAT", "value": "json"} in container["env"]


def test_pod_labels_cannot_break_the_selector() -> None:
    values = {"operator": {"podLabels": {"app.kubernetes.io/component": "hijacked"}}}
    dep = one(render(values), "Deployment")
    selector = dep["spec"]["selector"]["matchLabels"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


# -- objects reference each other correctly --------------------------------------------------

@pytest.mark.parametrize("variant", ["default", "non-default"])
def test_objects_reference_each_other(variant: str) -> None:
    values, apis = VARIANTS[variant if variant == "default" else "non-default"]
    docs = render(values, apis)
    dep = one(docs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    # Service -> operator pod
    svc = one(docs, "Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    # ServiceAccount <- Deployment, (Cluster)RoleBinding
    sa = one(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    namespaced = bool(values.get("operator", {}).get("watchNamespace"))
    binding = one(docs, "RoleBinding" if namespaced else "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    role = one(docs, "Role" if namespaced else "ClusterRole")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    # PVC <- the claim the operator gives function and driver pods
    pvc = one(docs, "PersistentVolumeClaim")
    assert env_of(dep)["RLHFLESS_WEIGHTS_PVC"] == pvc["metadata"]["name"]
    # ServiceMonitor -> metrics Service
    if apis:
        monitor = one(docs, "ServiceMonitor")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= \
            svc["metadata"]["labels"].items()
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= \
            {p["name"] for p in svc["spec"]["ports"]}


def test_weights_claim_is_readwritemany_and_kept() -> None:
    pvc = one(render(), "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "rlhfless-weights"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert "storageClassName" not in pvc["spec"]  # cluster default
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    custom = one(render(NON_DEFAULT_VALUES), "PersistentVolumeClaim")
    assert custom["spec"]["storageClassName"] == ""  # "-": static binding only
    assert custom["metadata"]["annotations"] == {"backup": "daily"}
    named = one(render({"weights": {"storageClassName": "nfs"}}), "PersistentVolumeClaim")
    assert named["spec"]["storageClassName"] == "nfs"


# -- Prometheus Operator objects ---------------------------------------------------------------

def test_monitors_render_only_when_enabled_and_served() -> None:
    enabled = {"metrics": {"serviceMonitor": {"enabled": True}},
               "functions": {"podMonitor": {"enabled": True}}}
    assert not by_kind(render(enabled), "ServiceMonitor")  # API not served
    assert not by_kind(render(enabled), "PodMonitor")
    assert not by_kind(render({}, PROMETHEUS_OPERATOR_API), "ServiceMonitor")  # not enabled
    docs = render(enabled, PROMETHEUS_OPERATOR_API)
    assert len(by_kind(docs, "ServiceMonitor")) == 1
    assert len(by_kind(docs, "PodMonitor")) == 1


def test_service_monitor_keeps_the_operators_job_labels() -> None:
    """Operator series carry `namespace`/`job` (the RLHFJob's); without honorLabels
    Prometheus would rename them exported_namespace/exported_job and the dashboard's
    filters would match nothing."""
    from rlhfless.operator.metrics import OperatorMetrics

    labels = set()
    for metric in vars(OperatorMetrics()).values():
        labels.update(getattr(metric, "_labelnames", ()))
    monitor = one(render(NON_DEFAULT_VALUES, PROMETHEUS_OPERATOR_API), "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert {"namespace", "job"} <= labels
    assert endpoint["honorLabels"] is True
    assert endpoint["interval"] == "15s" and endpoint["scrapeTimeout"] == "10s"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_pod_monitor_selects_the_function_pods_the_operator_builds() -> None:
    job = load_job(REPO / "examples" / "tiny-grpo.yaml")
    services = build_services(job, namespace="ml-team", uid="0123456789abcdef")
    monitor = one(render(NON_DEFAULT_VALUES, PROMETHEUS_OPERATOR_API), "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    for svc in services:
        pod_labels = svc["spec"]["template"]["metadata"]["labels"]  # revision pods get these
        assert selector.items() <= pod_labels.items(), svc["metadata"]["name"]
        assert "rlhfless.io/job" in pod_labels  # relabelled to `job`
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml-team"]}
    everywhere = one(render({"functions": {"podMonitor": {"enabled": True}}},
                            PROMETHEUS_OPERATOR_API), "PodMonitor")
    assert everywhere["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = everywhere["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "user-port"
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabel == {"job": ["__meta_kubernetes_pod_label_rlhfless_io_job"]}


# -- the Knative Services the operator builds with the chart's settings ---------------------

def _knative_validator() -> jsonschema.Draft4Validator:
    if not KNATIVE_CRD.exists():
        pytest.skip(f"Knative Service CRD not found at {KNATIVE_CRD}")
    crd = yaml.safe_load(KNATIVE_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("values", [{}, NON_DEFAULT_VALUES], ids=["default", "non-default"])
@pytest.mark.parametrize("example", ["tiny-grpo.yaml", "tiny-ppo.yaml"])
def test_knative_services_from_chart_settings_are_valid(values: dict[str, Any],
                                                        example: str) -> None:
    validator = _knative_validator()
    docs = render(values)
    config = OperatorConfig.from_env(env_of(one(docs, "Deployment")))
    claim = (one(docs, "PersistentVolumeClaim")["metadata"]["name"]
             if values.get("weights", {}).get("create", True) else None)
    job = load_job(REPO / "examples" / example)
    services = build_services(job, namespace=NAMESPACE, uid="0123456789abcdef",
                              settings=config.functions)
    assert [svc["metadata"]["labels"]["rlhfless.io/stage"] for svc in services] == [
        "actor", "reward", "learner"]  # the learner holds the reference and the critic
    for svc in services:
        errors = sorted(validator.iter_errors(svc), key=lambda e: list(e.path))
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
        assert check_webhook_rules(
            svc, allow_zero_initial_scale=config.functions.allow_zero_initial_scale) == []
        pod = svc["spec"]["template"]["spec"]
        assert pod["timeoutSeconds"] == config.functions.timeout_s
        if svc["metadata"]["labels"]["rlhfless.io/stage"] == "reward":
            continue  # no weights, no volume
        # Functions mount the chart's claim, where the settings say.
        volume = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
        assert volume == claim == config.functions.weights_pvc
        mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
        assert mount == config.functions.data_mount


# -- packaging --------------------------------------------------------------------------------

def test_chart_has_no_symlinks_and_packages(tmp_path: Path) -> None:
    from helm_chart import run_helm

    assert not [p for p in CHART.rglob("*") if p.is_symlink()]
    run_helm("package", str(CHART), "--destination", str(tmp_path))
    assert (tmp_path / "rlhfless-0.1.0.tgz").exists()


def test_notes_render_with_the_release_details() -> None:
    from helm_chart import run_helm

    out = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                   "--set", "operator.watchNamespace=ml-team").stdout
    notes = out.split("NOTES:", 1)[1]
    assert f"deployment/{RELEASE}-rlhfless" in notes
    assert 'namespace "ml-team"' in notes
    assert "kubernetes.podspec-persistent-volume-claim" in notes
