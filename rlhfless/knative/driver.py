"""The job's driver pod: a `batch/v1` Job, its own ServiceAccount and a least-privilege Role.

The driver runs `rlhfless driver` on the operator's (CPU) image with the Knative runtime. It
mounts only its job's folder of the store volume (and, read-only, the shared `models/`
folder that specs may name), runs restricted, and is the only pod of the job with an API
token. Its Role (`DRIVER_RULES`, narrowed by `resourceNames` to this job's objects where the
API allows it) is what the Knative runtime and the progress report call; the tests record
the driver's calls and check them against it.

`backoffLimit: 0`: the operator, not the Job controller, decides about retries (it reports
each failure, backs off, and recreates the Job; the new pod resumes from the checkpoint). On
SIGTERM (suspend, spec change, eviction) the driver finishes the step in flight within
`terminationGracePeriodSeconds`, checkpoints it and exits.
"""

from __future__ import annotations

from typing import Any

from rlhfless.api.progress import PROGRESS_KEY
from rlhfless.api.spec import RLHFJob
from rlhfless.cost.prices import CostDefaults, cost_env
from rlhfless.knative.pods import (
    LABEL_COMPONENT,
    LABEL_JOB,
    FunctionSettings,
    job_env,
    job_mount,
    models_mount,
    restricted_container_context,
    restricted_pod_context,
    scratch_mount,
    scratch_volume,
    store_volume,
)
from rlhfless.knative.services import owner_reference, service_name

ApiCall = tuple[str, str, str]  # (apiGroup, resource, verb)
DRIVER_COMPONENT = "driver"

# (apiGroup, resource, verb) → whether the rule is narrowed to this job's objects by name.
# `list` cannot be narrowed by name: the driver sees pod metadata of its namespace.
_DRIVER_RULES: dict[ApiCall, bool] = {
    ("serving.knative.dev", "services", "get"): True,  # URL and readiness
    ("serving.knative.dev", "services", "patch"): True,  # prewarm: min-scale
    # Metering (GPU-seconds from pod lifetimes); the same list gives the pod IPs a hand-off
    # calls a streaming actor at directly (`KnativeRuntime.invoke_instance`): no new verb.
    ("", "pods", "list"): False,
    ("", "configmaps", "patch"): True,  # progress after every step, for the operator
}
DRIVER_RULES: frozenset[ApiCall] = frozenset(_DRIVER_RULES)


def driver_name(job_name: str) -> str:
    return f"{job_name}-driver"


def progress_name(job_name: str) -> str:
    return f"{job_name}-progress"


def child_meta(job: RLHFJob, namespace: str, uid: str, name: str,
               component: str = DRIVER_COMPONENT) -> dict[str, Any]:
    """Metadata of a child object of the job: labels, owned by (and deleted with) the job."""
    return {"name": name, "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "rlhfless", LABEL_COMPONENT: component,
                       "app.kubernetes.io/managed-by": "rlhfless-operator",
                       LABEL_JOB: job.metadata.name},
            "ownerReferences": [owner_reference(job.metadata.name, uid)]}


def build_service_account(job: RLHFJob, *, namespace: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": child_meta(job, namespace, uid, driver_name(job.metadata.name)),
            # Only the driver pod opts in to a token; nothing else may borrow this account's.
            "automountServiceAccountToken": False}


def driver_rules(job: RLHFJob) -> list[dict[str, Any]]:
    """The Role's rules: one per (apiGroup, resource, narrowed?), verbs sorted."""
    names = {
        "services": sorted(service_name(job.metadata.name, s) for s in job.spec.stages.deployed),
        "configmaps": [progress_name(job.metadata.name)],
    }
    grouped: dict[tuple[str, str, bool], set[str]] = {}
    for (group, resource, verb), narrowed in _DRIVER_RULES.items():
        grouped.setdefault((group, resource, narrowed), set()).add(verb)
    rules = []
    for (group, resource, narrowed), verbs in sorted(grouped.items()):
        rule: dict[str, Any] = {"apiGroups": [group], "resources": [resource]}
        if narrowed:
            rule["resourceNames"] = names[resource]
        rule["verbs"] = sorted(verbs)
        rules.append(rule)
    return rules


def build_role(job: RLHFJob, *, namespace: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": child_meta(job, namespace, uid, driver_name(job.metadata.name)),
            "rules": driver_rules(job)}


def build_role_binding(job: RLHFJob, *, namespace: str, uid: str) -> dict[str, Any]:
    name = driver_name(job.metadata.name)
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": child_meta(job, namespace, uid, name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]}


def build_progress_config_map(job: RLHFJob, *, namespace: str, uid: str) -> dict[str, Any]:
    """Where the driver publishes its progress (it may patch only this object); the operator
    turns it into the job's status."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": child_meta(job, namespace, uid, progress_name(job.metadata.name)),
            "data": {PROGRESS_KEY: "{}"}}


def build_driver_job(job: RLHFJob, *, namespace: str, uid: str,
                     settings: FunctionSettings | None = None,
                     cost: CostDefaults | None = None) -> dict[str, Any]:
    """`cost`: the cluster's GPU type and prices (the operator's), which the driver prices
    the job with."""
    settings = settings or FunctionSettings()
    name = job.metadata.name
    meta = child_meta(job, namespace, uid, driver_name(name))
    mounts = [job_mount(settings, namespace, name, uid, read_only=False), scratch_mount()]
    if (models := models_mount(settings)) is not None:
        mounts.append(models)
    resources = job.spec.resources.driver
    container: dict[str, Any] = {
        "name": "driver",
        "image": settings.image,
        "command": ["rlhfless"],
        "args": ["driver", "--namespace", namespace,
                 "--run-dir", f"{settings.data_mount}/run",
                 "--store", f"{settings.data_mount}/store"],
        # The driver's Knative runtime needs the operator's function settings too.
        "env": job_env(job, namespace) + settings.runtime_env() + cost_env(cost or
                                                                         CostDefaults()),
        "resources": {"requests": {"cpu": resources.cpu, "memory": resources.memory},
                      "limits": {"memory": resources.memory}},
        "securityContext": restricted_container_context(),
        "volumeMounts": mounts,
    }
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": dict(meta["labels"])},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": driver_name(name),
                    "automountServiceAccountToken": True,  # the one pod that calls the API
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": settings.driver_grace_s,
                    "securityContext": restricted_pod_context(),
                    "containers": [container],
                    "volumes": [store_volume(settings), scratch_volume()],
                },
            },
        },
    }
