"""What every pod of a job shares: a restricted security context, scratch space, the job's
slice of the store volume, the job's token and spec.

Pods pass the Pod Security "restricted" profile (non-root uid of the image, no privilege
escalation, every capability dropped, the runtime's default seccomp profile) with a
read-only root filesystem: HOME, TMPDIR and caches live on an emptyDir. Knative takes the
security context per container (its pod-level `securityContext` needs a feature flag) and
reserves /tmp as a mount path, so scratch is mounted at `/scratch`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rlhfless import __version__
from rlhfless.api.imageref import image_errors
from rlhfless.api.spec import RLHFJob, dump_job
from rlhfless.api.wire import JOB_ENV, TOKEN_ENV

IMAGE_UID = 10001  # the Dockerfile's user (uid and gid)
SCRATCH = "/scratch"
STORE_VOLUME = "weights"
SCRATCH_VOLUME = "scratch"
MODELS_VOLUME_MOUNT = "/models"
TOKEN_KEY = "token"
DEFAULT_IMAGE = f"ghcr.io/rlhfless/rlhfless:{__version__}"
DEFAULT_GPU_IMAGE = f"{DEFAULT_IMAGE}-gpu"
LABEL_JOB = "rlhfless.io/job"
LABEL_COMPONENT = "app.kubernetes.io/component"


@dataclass(frozen=True)
class FunctionSettings:
    """Cluster-specific knobs the job spec does not carry (the operator reads them from env)."""

    weights_pvc: str = "rlhfless-weights"
    data_mount: str = "/data"  # where a pod mounts its job's folder of the weights volume
    timeout_s: int = 600  # Knative's default max-revision-timeout-seconds
    progress_deadline_s: int = 1200  # GPU model loads can exceed Knative's 600 s default
    allow_zero_initial_scale: bool = False  # config-autoscaler allow-zero-initial-scale
    image_pull_policy: str | None = None
    service_account: str | None = None  # of function pods (they get no API token anyway)
    image: str = DEFAULT_IMAGE  # CPU functions and the driver
    gpu_image: str = DEFAULT_GPU_IMAGE  # functions of stages with GPUs
    driver_grace_s: int = 600  # SIGTERM → the driver finishes its step within this
    meter_interval_s: float = 5.0  # the driver's polling of its functions' pod lifetimes
    # Namespaces whose pods may reach a job's functions: Knative's activator (always in the
    # request path: target-burst-capacity -1) and whatever scrapes /metrics.
    ingress_namespaces: tuple[str, ...] = ("knative-serving",)
    # Folder of the volume mounted read-only at /models in driver pods (base models and
    # datasets a spec may name) and scorer pods (reward models); "" mounts none.
    models_subpath: str = "models"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> FunctionSettings:
        """The operator's settings (its Deployment's env, set by the Helm chart); a
        malformed image reference is a ValueError naming its variable."""
        ingress = env.get("RLHFLESS_INGRESS_NAMESPACES", "knative-serving")
        for var in ("RLHFLESS_FUNCTION_IMAGE", "RLHFLESS_FUNCTION_GPU_IMAGE"):
            if env.get(var) and (errors := image_errors(env[var])):
                raise ValueError(f"{var} (Helm values functions.images): {errors[0]}")
        return cls(
            weights_pvc=env.get("RLHFLESS_WEIGHTS_PVC", "rlhfless-weights"),
            data_mount=env.get("RLHFLESS_FUNCTION_DATA_MOUNT", "/data"),
            timeout_s=int(env.get("RLHFLESS_FUNCTION_TIMEOUT_S", "600")),
            progress_deadline_s=int(env.get("RLHFLESS_PROGRESS_DEADLINE_S", "1200")),
            allow_zero_initial_scale=_bool(env.get("RLHFLESS_ALLOW_ZERO_INITIAL_SCALE")),
            image_pull_policy=env.get("RLHFLESS_IMAGE_PULL_POLICY") or None,
            service_account=env.get("RLHFLESS_FUNCTION_SERVICE_ACCOUNT") or None,
            image=env.get("RLHFLESS_FUNCTION_IMAGE") or DEFAULT_IMAGE,
            gpu_image=env.get("RLHFLESS_FUNCTION_GPU_IMAGE") or DEFAULT_GPU_IMAGE,
            driver_grace_s=int(env.get("RLHFLESS_DRIVER_GRACE_S", "600")),
            meter_interval_s=float(env.get("RLHFLESS_METER_INTERVAL_S", "5")),
            ingress_namespaces=tuple(n.strip() for n in ingress.split(",") if n.strip()),
            models_subpath=env.get("RLHFLESS_MODELS_SUBPATH", "models"),
        )

    def runtime_env(self) -> list[dict[str, str]]:
        """What the driver pod's Knative runtime reads back with `from_env`."""
        return [
            {"name": "RLHFLESS_FUNCTION_TIMEOUT_S", "value": str(self.timeout_s)},
            {"name": "RLHFLESS_PROGRESS_DEADLINE_S", "value": str(self.progress_deadline_s)},
            {"name": "RLHFLESS_ALLOW_ZERO_INITIAL_SCALE",
             "value": str(self.allow_zero_initial_scale).lower()},
            {"name": "RLHFLESS_METER_INTERVAL_S", "value": str(self.meter_interval_s)},
        ]


def _bool(value: str | None, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def job_dir(namespace: str, name: str, uid: str) -> str:
    """Relative home of one job on the weights volume; the uid keeps a re-created job with
    the same name from resuming its predecessor's checkpoint."""
    return f"jobs/{namespace}/{name}-{uid[:8]}"


def token_secret_name(job_name: str) -> str:
    return f"{job_name}-token"


def image_for(settings: FunctionSettings, gpus: int) -> str:
    return settings.gpu_image if gpus > 0 else settings.image


def restricted_container_context() -> dict[str, Any]:
    """Pod Security "restricted", set per container (what Knative allows without flags)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": IMAGE_UID,
        "runAsGroup": IMAGE_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_pod_context() -> dict[str, Any]:
    """The pod-level half, for pods Kubernetes builds directly (the driver's Job)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": IMAGE_UID,
        "runAsGroup": IMAGE_UID,
        "fsGroup": IMAGE_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def job_env(job: RLHFJob, namespace: str) -> list[dict[str, Any]]:
    """The job (as its custom resource's JSON: a spec change rolls new pods), the job's
    token from its Secret, and writable homes for caches on the scratch volume."""
    document = dump_job(job)
    document["metadata"]["namespace"] = namespace
    return [
        {"name": JOB_ENV, "value": json.dumps(document, separators=(",", ":"))},
        {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {
            "name": token_secret_name(job.metadata.name), "key": TOKEN_KEY}}},
        {"name": "HOME", "value": SCRATCH},
        {"name": "TMPDIR", "value": SCRATCH},
        {"name": "MPLCONFIGDIR", "value": f"{SCRATCH}/matplotlib"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def scratch_volume() -> dict[str, Any]:
    return {"name": SCRATCH_VOLUME, "emptyDir": {}}


def scratch_mount() -> dict[str, Any]:
    return {"name": SCRATCH_VOLUME, "mountPath": SCRATCH}


def store_volume(settings: FunctionSettings) -> dict[str, Any]:
    return {"name": STORE_VOLUME, "persistentVolumeClaim": {"claimName": settings.weights_pvc}}


def models_mount(settings: FunctionSettings) -> dict[str, Any] | None:
    """The volume's shared `models/` folder, read-only at /models (None: none configured)."""
    if not settings.models_subpath:
        return None
    return {"name": STORE_VOLUME, "mountPath": MODELS_VOLUME_MOUNT,
            "subPath": settings.models_subpath, "readOnly": True}


def job_mount(settings: FunctionSettings, namespace: str, name: str, uid: str, *,
              read_only: bool) -> dict[str, Any]:
    """Only this job's folder of the shared volume: no pod of a job sees another job's."""
    mount: dict[str, Any] = {"name": STORE_VOLUME, "mountPath": settings.data_mount,
                             "subPath": job_dir(namespace, name, uid)}
    if read_only:
        mount["readOnly"] = True
    return mount
