"""Knative Services for an RLHFJob, built as plain data.

One `serving.knative.dev/v1` Service per deployed stage of the job's stage table. Each
revision runs `rlhfless serve --stage <stage>` on the operator's function image (the GPU
variant for stages with GPUs), reads the job from the `RLHFJOB_SPEC` environment variable
(the custom resource as JSON, so a spec change rolls a new revision), its bearer token from
the job's Secret, and the weights from the job's own folder of a shared ReadWriteMany volume
(the reward and scorer functions mount none). Pods are
restricted (`knative.pods`) and get no service-account token. Pure functions: the operator
creates what these return; tests validate them against Knative's CRD schema and its
admission webhook's rules.
"""

from __future__ import annotations

from typing import Any

from rlhfless.api.spec import API_VERSION, KIND, RLHFJob
from rlhfless.knative.pods import (
    LABEL_COMPONENT,
    LABEL_JOB,
    FunctionSettings,
    image_for,
    job_env,
    job_mount,
    models_mount,
    restricted_container_context,
    scratch_mount,
    scratch_volume,
    store_volume,
)

KNATIVE_API_VERSION = "serving.knative.dev/v1"
KNATIVE_GROUP = "serving.knative.dev"
AUTOSCALING = "autoscaling.knative.dev/"
FUNCTION_PORT = 8080
GPU_RESOURCE = "nvidia.com/gpu"
KNATIVE_MAX_TIMEOUT_S = 600  # Knative's default max-revision-timeout-seconds
LABEL_STAGE = "rlhfless.io/stage"
LABEL_KSVC = "serving.knative.dev/service"
VISIBILITY_LABEL = "networking.knative.dev/visibility"
# The reward and scorer functions need no weights of the store (a reward model is read from
# reward.model.path); the actor and the learner write (the learner publishes versions, the
# vLLM actor hard-links its exports next to the store).
_NO_STORE = frozenset({"reward", "scorer"})
# The scorer reads its reward model (reward.model.path) from the volume's shared models/
# folder, read-only at /models, as a driver reads a base model.
_READS_MODELS = frozenset({"scorer"})


def service_name(job_name: str, stage: str) -> str:
    return f"{job_name}-{stage}"


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
        # The activator stays in every request's path, so a job's NetworkPolicy needs to
        # admit only the activator's namespace (and the job's driver).
        AUTOSCALING + "target-burst-capacity": "-1",
        "serving.knative.dev/progress-deadline": _seconds(settings.progress_deadline_s),
    }


def scale_patch(job: RLHFJob, stage: str, n: int, settings: FunctionSettings) -> dict[str, Any]:
    """The merge patch that keeps at least `n` warm pods of a stage's Service (0: scale to
    zero after the keep-alive); Knative rolls a new revision when the bounds change."""
    initial = 0 if settings.allow_zero_initial_scale else 1
    return {"spec": {"template": {"metadata": {"annotations": {
        AUTOSCALING + "min-scale": str(n),
        AUTOSCALING + "max-scale": str(max(n, job.spec.stages[stage].max_scale)),
        AUTOSCALING + "initial-scale": str(max(n, initial)),
    }}}}}


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
    store = f"{settings.data_mount}/store"
    labels = {
        "app.kubernetes.io/name": "rlhfless",
        LABEL_COMPONENT: stage,
        "app.kubernetes.io/managed-by": "rlhfless-operator",
        LABEL_JOB: name,
        LABEL_STAGE: stage,
    }
    mounts = [scratch_mount()]
    volumes = [scratch_volume()]
    if stage not in _NO_STORE:
        mounts.insert(0, job_mount(settings, namespace, name, uid, read_only=False))
        volumes.insert(0, store_volume(settings))
    if stage in _READS_MODELS and (models := models_mount(settings)) is not None:
        mounts.insert(0, models)
        volumes.insert(0, store_volume(settings))
    container: dict[str, Any] = {
        "name": "function",
        "image": image_for(settings, job.spec.stages[stage].gpus),
        "command": ["rlhfless"],
        "args": ["serve", "--stage", stage, "--port", str(FUNCTION_PORT),
                 "--host", "0.0.0.0", "--store", store],
        "ports": [{"name": "http1", "containerPort": FUNCTION_PORT}],
        "env": job_env(job, namespace),
        "resources": _resources(job, stage),
        # Ready only once the weights are loaded, so cold starts include the model load.
        "readinessProbe": {"httpGet": {"path": "/healthz"}, "periodSeconds": 2,
                           "failureThreshold": 3},
        "securityContext": restricted_container_context(),
        "volumeMounts": mounts,
    }
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    pod_spec: dict[str, Any] = {
        # Stage functions serve one request at a time (the app serialises them anyway);
        # telling Knative makes it route the N-th parallel request to the N-th pod.
        "containerConcurrency": 1,
        "timeoutSeconds": min(settings.timeout_s, KNATIVE_MAX_TIMEOUT_S),
        # Functions never call the Kubernetes API: no token in their pods.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": volumes,
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
