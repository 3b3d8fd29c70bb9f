"""Knative's admission webhook rules, emulated for tests (no Knative API server here).

The rules of knative.dev/serving's annotation_validation.go and the revision validation: a
Service the webhook would reject is a bug in our builders, caught without a cluster.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

from rlhfless.knative.services import AUTOSCALING, KNATIVE_MAX_TIMEOUT_S

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

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
    if (found := _parsed(annotations, errors, float, "target-burst-capacity")) is not None:
        key, value, tbc = found
        if tbc < 0 and tbc != -1:
            errors.append(f"{key}: {value} must be non-negative or -1")
    if (found := _first(annotations, "metric")) is not None:
        key, value = found
        klass = annotations.get(AUTOSCALING + "class", "kpa.autoscaling.knative.dev")
        if klass == "kpa.autoscaling.knative.dev" and value not in ("concurrency", "rps"):
            errors.append(f"{key}: invalid value {value!r} for the KPA")
    return errors


# knative.dev/serving pkg/apis/serving/k8s_validation.go
RESERVED_MOUNT_PATHS = frozenset({"/", "/dev", "/dev/log", "/tmp", "/var", "/var/log"})
RESERVED_ENV = frozenset({"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"})
RESERVED_CONTAINER_NAMES = frozenset({"queue-proxy"})


def _check_volumes(pod: dict[str, Any]) -> list[str]:
    """Mount paths (reserved, duplicate, relative), volumes without a mount or without a
    volume, reserved env names and container names."""
    errors = []
    volumes = [v.get("name") for v in pod.get("volumes") or []]
    if len(volumes) != len(set(volumes)):
        errors.append("spec.template.spec.volumes: duplicate volume name")
    mounted: set[str] = set()
    for i, container in enumerate(pod.get("containers", [])):
        where = f"spec.template.spec.containers[{i}]"
        if container.get("name") in RESERVED_CONTAINER_NAMES:
            errors.append(f"{where}.name: {container['name']!r} is a reserved container name")
        for env in container.get("env") or []:
            if env.get("name") in RESERVED_ENV:
                errors.append(f"{where}.env: {env['name']!r} is a reserved environment variable")
        seen: set[str] = set()
        for j, mount in enumerate(container.get("volumeMounts") or []):
            path = os.path.normpath(mount.get("mountPath", ""))
            mounted.add(mount.get("name"))
            if mount.get("name") not in volumes:
                errors.append(f"{where}.volumeMounts[{j}]: volumeMount has no matching volume")
            if path in RESERVED_MOUNT_PATHS:
                errors.append(f"{where}.volumeMounts[{j}]: mountPath {path!r} is a reserved path")
            elif not path.startswith("/"):
                errors.append(f"{where}.volumeMounts[{j}]: mountPath must be absolute")
            elif path in seen:
                errors.append(f"{where}.volumeMounts[{j}]: mountPath {path!r} must be unique")
            seen.add(path)
    for name in volumes:
        if name not in mounted:
            errors.append(f"spec.template.spec.volumes: volume with name {name!r} not mounted")
    return errors


def check_webhook_rules(service: dict[str, Any], *, allow_zero_initial_scale: bool = False,
                        max_timeout_s: int = KNATIVE_MAX_TIMEOUT_S,
                        max_scale_limit: int = 0) -> list[str]:
    """What Knative's admission webhook would reject in `service` (empty list: accepted).

    Covers the autoscaling annotations (knative.dev/serving annotation_validation.go: scale
    bounds, activation-scale, initial-scale, target, utilisation, window, retention,
    target-burst-capacity), the revision timeout, containerConcurrency, the readiness probe
    port, and the pod spec rules of k8s_validation.go (reserved mount paths such as /tmp,
    unique mounts, every volume mounted, reserved env and container names).
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
    errors += _check_volumes(pod)
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
