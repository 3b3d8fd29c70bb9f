"""Per-job isolation objects: the function token's Secret and the NetworkPolicy.

The Secret holds a random token that the job's functions require on every call and its
driver presents (`functions.auth`). The NetworkPolicy admits traffic to the job's pods only
from its driver pod, on the functions' own port (the driver calls a streaming actor's pod by
IP for a hand-off, bypassing the activator: `KnativeRuntime.invoke_instance`), and from the
namespaces of the request path (Knative's activator, which target-burst-capacity -1 keeps in
every request's path, and what else the cluster admin lists, e.g. Prometheus). Both are
owned by the job and go with it.
"""

from __future__ import annotations

import secrets
from typing import Any

from rlhfless.api.spec import RLHFJob
from rlhfless.knative.driver import DRIVER_COMPONENT, child_meta
from rlhfless.knative.pods import (
    LABEL_COMPONENT,
    LABEL_JOB,
    TOKEN_KEY,
    FunctionSettings,
    token_secret_name,
)
from rlhfless.knative.services import FUNCTION_PORT

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace


def new_token() -> str:
    return secrets.token_urlsafe(32)


def build_token_secret(job: RLHFJob, *, namespace: str, uid: str,
                       token: str | None = None) -> dict[str, Any]:
    """The job's function token (a fresh random one unless given). The operator only ever
    creates it: an existing Secret keeps its token, so running pods keep working."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": child_meta(job, namespace, uid, token_secret_name(job.metadata.name),
                                   "token"),
            "stringData": {TOKEN_KEY: token or new_token()}}


def network_policy_name(job_name: str) -> str:
    return f"{job_name}-functions"


def build_network_policy(job: RLHFJob, *, namespace: str, uid: str,
                         settings: FunctionSettings | None = None) -> dict[str, Any]:
    settings = settings or FunctionSettings()
    name = job.metadata.name
    ingress: list[dict[str, Any]] = [{
        "from": [{"podSelector": {"matchLabels": {LABEL_JOB: name,
                                                  LABEL_COMPONENT: DRIVER_COMPONENT}}}],
        "ports": [{"protocol": "TCP", "port": FUNCTION_PORT}],
    }]
    if settings.ingress_namespaces:
        # The activator reaches the queue-proxy (8012), the autoscaler its metrics: no port
        # list, these namespaces are the platform's own.
        ingress.append({"from": [{"namespaceSelector": {"matchExpressions": [{
            "key": NAMESPACE_NAME_LABEL, "operator": "In",
            "values": sorted(settings.ingress_namespaces)}]}}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": child_meta(job, namespace, uid, network_policy_name(name), "network"),
            "spec": {"podSelector": {"matchLabels": {LABEL_JOB: name}},
                     "policyTypes": ["Ingress"],
                     "ingress": ingress}}
