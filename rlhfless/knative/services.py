"""Knative Services for an RLHFJob, built as plain data.

One `serving.knative.dev/v1` Service per deployed stage of the job's stage table. Each
revision runs `rlhfless serve --stage <stage>` on the job's image, reads the
job from the `RLHFJOB_SPEC` environment variable (the custom resource as JSON, so a spec
change rolls a new revision) and the weights from a shared ReadWriteMany volume. Pure
functions: the operator creates what these return; tests validate them against Knative's
CRD schema and its admission webhook's rules.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from rlhfless.api.spec import API_VERSION, KIND, RLHFJob, dump_job
from rlhfless.api.wire import JOB_ENV

KNATIVE_API_VERSION = "serving.knative.dev/v1"
KNATIVE_GROUP = "serving.knative.dev"
AUTOSCALING = "autoscaling.knative.dev/"
FUNCTION_PORT = 8080
GPU_RESOURCE = "nvidia.com/gpu"
KNATIVE_MAX_TIMEOUT_S = 600  # Knative's default max-revision-timeout-seconds
LABEL_JOB = "rlhfless.io/job"
LABEL_STAGE = "rlhfless.io/stage"
LABEL_KSVC = "serving.knative.dev/service"
VISIBILITY_LABEL = "networking.knative.dev/visibility"
# Knative names revisions "<service>-00001" and their private Services "<revision>-private";
# both must stay DNS labels (63 chars). A 10-character "-<stage>" suffix is reserved (the
# longest stage, "-learner", takes 8): job names accepted by earlier versions stay valid.
STAGE_SUFFIX_RESERVE = 10
MAX_JOB_NAME = 63 - len("-00001-private") - STAGE_SUFFIX_RESERVE
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class FunctionSettings:
    """Cluster-specific knobs the job spec does not carry (the operator reads them from env)."""

    weights_pvc: str = "rlhfless-weights"
    data_mount: str = "/data"  # where the weights volume is mounted in function pods
    timeout_s: int = KNATIVE_MAX_TIMEOUT_S
    progress_deadline_s: int = 1200  # GPU model loads can exceed Knative's 600 s default
    allow_zero_initial_scale: bool = False  # config-autoscaler allow-zero-initial-scale
    image_pull_policy: str | None = None
    service_account: str | None = None


def service_name(job_name: str, stage: str) -> str:
    return f"{job_name}-{stage}"


def job_dir(namespace: str, name: str, uid: str) -> str:
    """Relative home of one job on the weights volume; the uid keeps a re-created job with
    the same name from resuming its predecessor's checkpoint."""
    return f"jobs/{namespace}/{name}-{uid[:8]}"


def name_errors(name: str) -> list[str]:
    """Why a job name cannot name its Knative Services (empty when it can)."""
    errors = []
    if not _DNS1035.match(name):
        errors.append("metadata.name: must start with a letter and contain only lowercase "
                      "letters, digits and '-' (a DNS-1035 label, as Knative Services need)")
    if len(name) > MAX_JOB_NAME:
        errors.append(f"metadata.name: at most {MAX_JOB_NAME} characters (Knative derives "
                      f"revision and Service names from it), got {len(name)}")
    return errors


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """Children are garbage-collected with the job; `controller` marks who reconciles them."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _seconds(value: float) -> str:
    return f"{int(round(value))}s"


def autoscaling_annotations(job: RLHFJob, stage: str, settings: FunctionSettings,
                            min_scale: int = 0) -> dict[str, str]:
    """Scale to zero after keepAliveS; one request per pod, so N requests mean N pods."""
    keep_alive = job.spec.scheduling.keep_alive_s
    max_scale = max(job.spec.stages[stage].max_scale, min_scale)
    initial = 0 if settings.allow_zero_initial_scale else 1
    return {
        AUTOSCALING + "class": "kpa.autoscaling.knative.dev",
        AUTOSCALING + "metric": "concurrency",
        AUTOSCALING + "target": "1",
        AUTOSCALING + "target-utilization-percentage": "100",
        AUTOSCALING + "min-scale": str(min_scale),
        AUTOSCALING + "max-scale": str(max_scale),
        AUTOSCALING + "initial-scale": str(max(initial, min_scale)),
        AUTOSCALING + "scale-to-zero-pod-retention-period": _seconds(keep_alive),
        AUTOSCALING + "window": _seconds(min(3600.0, max(6.0, keep_alive))),
        "serving.knative.dev/progress-deadline": _seconds(settings.progress_deadline_s),
    }


def _resources(job: RLHFJob, stage: str) -> dict[str, Any]:
    res = getattr(job.spec.resources, stage)
    gpus = job.spec.stages[stage].gpus
    limits: dict[str, Any] = {"memory": res.memory}
    if gpus > 0:
        limits[GPU_RESOURCE] = str(gpus)
    return {"requests": {"cpu": res.cpu, "memory": res.memory}, "limits": limits}


def build_service(job: RLHFJob, stage: str, *, namespace: str, uid: str,
                  settings: FunctionSettings | None = None) -> dict[str, Any]:
    settings = settings or FunctionSettings()
    name = job.metadata.name
    store = f"{settings.data_mount}/{job_dir(namespace, name, uid)}/store"
    labels = {
        "app.kubernetes.io/name": "rlhfless",
        "app.kubernetes.io/component": stage,
        "app.kubernetes.io/managed-by": "rlhfless-operator",
        LABEL_JOB: name,
        LABEL_STAGE: stage,
    }
    document = dump_job(job)
    document["metadata"]["namespace"] = namespace
    container: dict[str, Any] = {
        "name": "function",
        "image": job.spec.image,
        "command": ["rlhfless"],
        "args": ["serve", "--stage", stage, "--port", str(FUNCTION_PORT),
                 "--host", "0.0.0.0", "--store", store],
        "ports": [{"name": "http1", "containerPort": FUNCTION_PORT}],
        "env": [
            {"name": JOB_ENV, "value": json.dumps(document, separators=(",", ":"))},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "resources": _resources(job, stage),
        # Ready only once the weights are loaded, so cold starts include the model load.
        "readinessProbe": {"httpGet": {"path": "/healthz"}, "periodSeconds": 2,
                           "failureThreshold": 3},
        "volumeMounts": [{"name": "weights", "mountPath": settings.data_mount}],
    }
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    pod_spec: dict[str, Any] = {
        # Stage functions serve one request at a time (the app serialises them anyway);
        # telling Knative makes it route the N-th parallel request to the N-th pod.
        "containerConcurrency": 1,
        "timeoutSeconds": min(settings.timeout_s, KNATIVE_MAX_TIMEOUT_S),
        "containers": [container],
        "volumes": [{"name": "weights",
                     "persistentVolumeClaim": {"claimName": settings.weights_pvc}}],
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    return {
        "apiVersion": KNATIVE_API_VERSION,
        "kind": "Service",
        "metadata": {
            "name": service_name(name, stage),
            "namespace": namespace,
            "labels": {**labels, VISIBILITY_LABEL: "cluster-local"},
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": autoscaling_annotations(job, stage, settings),
                },
                "spec": pod_spec,
            },
        },
    }


def build_services(job: RLHFJob, *, namespace: str, uid: str,
                   settings: FunctionSettings | None = None) -> list[dict[str, Any]]:
    """One Service per stage the job deploys (its stage table); none for stages it never calls."""
    return [build_service(job, stage, namespace=namespace, uid=uid, settings=settings)
            for stage in job.spec.stages.deployed]
