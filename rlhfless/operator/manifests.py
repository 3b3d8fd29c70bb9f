"""Knative Services for an RLHFJob, built as plain data, plus Knative's admission rules.

One `serving.knative.dev/v1` Service per stage (actor, reference, reward, trainer, and critic
for PPO). Each revision runs `rlhfless serve --stage <stage>` on the job's image, reads the
job from the `RLHFJOB_SPEC` environment variable (the custom resource as JSON, so a spec
change rolls a new revision) and the weights from a shared ReadWriteMany volume. Pure
functions: the operator creates what these return; tests validate them against Knative's
CRD schema and `check_webhook_rules`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhfless.api.names import DNS1035_LABEL
from rlhfless.api.spec import API_VERSION, KIND, RLHFJob, dump_job

KNATIVE_API_VERSION = "serving.knative.dev/v1"
KNATIVE_GROUP = "serving.knative.dev"
AUTOSCALING = "autoscaling.knative.dev/"
FUNCTION_PORT = 8080
JOB_ENV = "RLHFJOB_SPEC"  # read by rlhfless.functions.serve
GPU_RESOURCE = "nvidia.com/gpu"
KNATIVE_MAX_TIMEOUT_S = 600  # Knative's default max-revision-timeout-seconds
LABEL_JOB = "rlhfless.io/job"
LABEL_STAGE = "rlhfless.io/stage"
LABEL_KSVC = "serving.knative.dev/service"
VISIBILITY_LABEL = "networking.knative.dev/visibility"
_DNS1035 = re.compile(DNS1035_LABEL)


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


def stages_for(job: RLHFJob) -> tuple[str, ...]:
    """The stage functions a job needs: the critic only exists for PPO."""
    stages = ["actor", "reference", "reward", "critic", "trainer"]
    if job.spec.algorithm.name != "ppo":
        stages.remove("critic")
    return tuple(stages)


def service_name(job_name: str, stage: str) -> str:
    return f"{job_name}-{stage}"


def job_dir(namespace: str, name: str, uid: str) -> str:
    """Relative home of one job on the weights volume; the uid keeps a re-created job with
    the same name from resuming its predecessor's checkpoint."""
    return f"jobs/{namespace}/{name}-{uid[:8]}"


def stage_max_scale(job: RLHFJob, stage: str) -> int:
    if stage == "actor":
        return job.spec.scheduling.max_actors
    return 1 if stage == "trainer" else 2


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
    max_scale = max(stage_max_scale(job, stage), min_scale)
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
    limits: dict[str, Any] = {"memory": res.memory}
    if res.gpus > 0:
        limits[GPU_RESOURCE] = str(res.gpus)
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
    return [build_service(job, stage, namespace=namespace, uid=uid, settings=settings)
            for stage in stages_for(job)]


# -- Knative's admission webhook rules (knative.dev/serving, autoscaling annotations) ----

_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string ("90s", "1m30s", "1h"); ValueError if malformed."""
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _GO_DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {text!r}")
    return total


def _first(annotations: dict[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        key = AUTOSCALING + name
        if key in annotations:
            return key, annotations[key]
    return None


def _parsed(annotations: dict[str, str], errors: list[str], parse: Callable[[str], Any],
            *names: str) -> tuple[str, str, Any] | None:
    """(key, raw text, parsed value) of the first of `names` present; unparsable → error."""
    found = _first(annotations, *names)
    if found is None:
        return None
    key, value = found
    try:
        return key, value, parse(value)
    except ValueError:
        errors.append(f"{key}: invalid value {value!r}")
        return None


def _int_ge0(annotations: dict[str, str], names: tuple[str, ...],
             errors: list[str]) -> int:
    found = _parsed(annotations, errors, int, *names)
    if found is None:
        return 0
    key, value, number = found
    if not 0 <= number <= 2**31 - 1:
        errors.append(f"{key}: {value} out of bounds [0, 2147483647]")
        return 0
    return number


def _check_annotations(annotations: dict[str, str], allow_zero_initial_scale: bool,
                       max_scale_limit: int) -> list[str]:
    errors: list[str] = []
    lo = _int_ge0(annotations, ("min-scale", "minScale"), errors)
    hi = _int_ge0(annotations, ("max-scale", "maxScale"), errors)
    if hi != 0 and hi < lo:
        errors.append(f"max-scale={hi} is less than min-scale={lo}")
    if max_scale_limit and _first(annotations, "max-scale", "maxScale") is not None:
        if hi > max_scale_limit:
            errors.append(f"max-scale={hi} is over the cluster's max-scale-limit "
                          f"{max_scale_limit}")
        if hi == 0:
            errors.append(f"max-scale=0 (unlimited) must be below {max_scale_limit}")
    if (found := _parsed(annotations, errors, int, "activation-scale")) is not None:
        activation = found[2]
        if lo > activation:
            errors.append(f"min-scale={lo} is greater than activation-scale={activation}")
        elif hi != 0 and hi < activation:
            errors.append(f"max-scale={hi} is less than activation-scale={activation}")
        elif activation < 2:
            errors.append(f"activation-scale={activation} must be greater than 1")
    if (found := _parsed(annotations, errors, int, "initial-scale", "initialScale")) is not None:
        key, _, initial = found
        if initial < 0:
            errors.append(f"{key}={initial} must be at least 0")
        elif initial == 0 and not allow_zero_initial_scale:
            errors.append(f"{key}=0 not allowed by cluster (allow-zero-initial-scale)")
    if (found := _parsed(annotations, errors, float, "target")) is not None:
        key, value, target = found
        if target < 0.01:
            errors.append(f"{key}: target {value} should be at least 0.01")
    if (found := _parsed(annotations, errors, float, "target-utilization-percentage")) is not None:
        key, value, percent = found
        if not 1 <= percent <= 100:
            errors.append(f"{key}: {value} out of bounds [1, 100]")
    if (found := _parsed(annotations, errors, parse_go_duration, "window")) is not None:
        key, value, seconds = found
        if not 6 <= seconds <= 3600:
            errors.append(f"{key}: {value} out of bounds [6s, 1h0m0s]")
        elif not math.isclose(seconds, round(seconds)):
            errors.append(f"{key}: must be specified with at most second precision")
    for name in ("scale-to-zero-pod-retention-period", "scale-down-delay"):
        if (found := _parsed(annotations, errors, parse_go_duration, name)) is not None:
            key, value, seconds = found
            if not 0 <= seconds <= 3600:
                errors.append(f"{key}: {value} out of bounds [0s, 1h0m0s]")
    if (found := _first(annotations, "metric")) is not None:
        key, value = found
        klass = annotations.get(AUTOSCALING + "class", "kpa.autoscaling.knative.dev")
        if klass == "kpa.autoscaling.knative.dev" and value not in ("concurrency", "rps"):
            errors.append(f"{key}: invalid value {value!r} for the KPA")
    return errors


def check_webhook_rules(service: dict[str, Any], *, allow_zero_initial_scale: bool = False,
                        max_timeout_s: int = KNATIVE_MAX_TIMEOUT_S,
                        max_scale_limit: int = 0) -> list[str]:
    """What Knative's admission webhook would reject in `service` (empty list: accepted).

    Covers the autoscaling annotations (knative.dev/serving annotation_validation.go: scale
    bounds, activation-scale, initial-scale, target, utilisation, window, retention), the
    revision timeout, containerConcurrency and the readiness probe port.
    """
    errors: list[str] = []
    name = service.get("metadata", {}).get("name", "")
    if not _DNS1035.match(name) or len(name) > 63:
        errors.append(f"metadata.name: {name!r} is not a DNS-1035 label")
    template = service.get("spec", {}).get("template", {})
    for where, meta in (("metadata", service.get("metadata", {})),
                        ("spec.template.metadata", template.get("metadata", {}))):
        for message in _check_annotations(meta.get("annotations", {}) or {},
                                          allow_zero_initial_scale, 0 if where == "metadata"
                                          else max_scale_limit):
            errors.append(f"{where}.annotations: {message}")
    pod = template.get("spec", {})
    timeout = pod.get("timeoutSeconds")
    if timeout is not None and not 0 <= timeout <= max_timeout_s:
        errors.append(f"spec.template.spec.timeoutSeconds: {timeout} out of bounds "
                      f"[0, {max_timeout_s}]")
    concurrency = pod.get("containerConcurrency")
    if concurrency is not None and not 0 <= concurrency <= 1000:
        errors.append(f"spec.template.spec.containerConcurrency: {concurrency} out of bounds "
                      "[0, 1000]")
    containers = pod.get("containers", [])
    if len(containers) != 1:
        errors.append("spec.template.spec.containers: exactly one serving container expected")
    for i, container in enumerate(containers):
        ports = [p.get("containerPort") for p in container.get("ports", [])]
        if len(ports) > 1:
            errors.append(f"spec.template.spec.containers[{i}].ports: more than one port")
        for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container.get(probe_name) or {}
            port = (probe.get("httpGet") or {}).get("port")
            if port is not None and port not in ports:
                errors.append(f"spec.template.spec.containers[{i}].{probe_name}: port must "
                              "be unset or the container port")
    return errors
