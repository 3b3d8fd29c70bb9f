"""Knative Services built for a job: Knative's CRD schema, its webhook rules, our fields."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from knative_webhook import check_webhook_rules, parse_go_duration

from rlhfless.api.names import MAX_JOB_NAME, name_errors
from rlhfless.api.spec import parse_job, parse_spec
from rlhfless.api.stages import STAGE_NAMES
from rlhfless.api.wire import JOB_ENV, TOKEN_ENV
from rlhfless.knative.services import (
    AUTOSCALING,
    FunctionSettings,
    build_service,
    build_services,
)

REPO = Path(__file__).resolve().parents[1]
KNATIVE_CRD = REPO.parent / "shared" / "knative" / "service-crd.yaml"
UID = "0f6b1c2d-3e4f-5a6b-7c8d-9e0f1a2b3c4d"

JOBS = {
    "default-grpo": {},
    "grpo-kl": {"algorithm": {"klBeta": 0.05}},
    "ppo-8-actors": {"algorithm": {"name": "ppo"},
                     "scheduling": {"actors": 4, "maxActors": 8, "keepAliveS": 120},
                     "resources": {"actor": {"gpus": 2, "cpu": "8", "memory": "64Gi"}}},
    "cpu-only": {"resources": {s: {"gpus": 0, "cpu": "500m", "memory": "2Gi"}
                               for s in ("actor", "reward", "learner")},
                 "scheduling": {"keepAliveS": 0}},
    "long-keepalive": {"scheduling": {"keepAliveS": 3600, "maxActors": 1, "actors": 1}},
    "reward-model": {"reward": {"name": "reward_model", "model": {"path": "/models/rm"}}},
}


def job(name: str):
    return parse_spec(JOBS[name], name)


@functools.cache
def knative_schema() -> dict[str, Any]:
    if not KNATIVE_CRD.exists():
        pytest.skip(f"Knative Service CRD not found at {KNATIVE_CRD} (the shared folder next "
                    "to the repository holds it)")
    crd = yaml.safe_load(KNATIVE_CRD.read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def pruned(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would silently drop: not in the structural schema."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if path == "" and key == "metadata":
                continue  # ObjectMeta is the server's own, never pruned
            if props is not None and key in props:
                out += pruned(sub, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += pruned(sub, extra, f"{path}.{key}")
            elif props is not None or extra is None:
                out.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += pruned(item, schema["items"], f"{path}[{i}]")
    return out


ALL = [(name, svc["metadata"]["name"], svc)
       for name in JOBS
       for svc in build_services(job(name), namespace="ml", uid=UID)]


@pytest.mark.parametrize("job_name,svc_name,service", ALL, ids=[a[1] for a in ALL])
def test_services_are_valid_knative_services(job_name: str, svc_name: str,
                                             service: dict[str, Any]) -> None:
    jsonschema.Draft4Validator(knative_schema()).validate(service)
    # The CRD has no additionalProperties: false, so a misspelt field would pass the schema
    # and then be pruned by the server: nothing we set may be outside the schema.
    assert pruned(service, knative_schema()) == []
    assert check_webhook_rules(service) == []


def names(job_name: str) -> list[str]:
    return [s["metadata"]["name"] for s in build_services(job(job_name), namespace="ml",
                                                          uid=UID)]


def test_one_service_per_stage_the_learner_fuses_reference_and_critic() -> None:
    # The reference (klBeta > 0) and the critic (PPO) live inside the learner: three
    # Services whatever the algorithm, never one the driver does not call.
    for name in ("default-grpo", "grpo-kl", "ppo-8-actors"):
        assert names(name) == [f"{name}-actor", f"{name}-reward", f"{name}-learner"]


def test_a_reward_model_job_gets_a_scorer_service_and_no_reward_service() -> None:
    assert names("reward-model") == ["reward-model-actor", "reward-model-scorer",
                                     "reward-model-learner"]
    svc = build_service(job("reward-model"), "scorer", namespace="ml", uid=UID)
    [c] = svc["spec"]["template"]["spec"]["containers"]
    assert c["args"][:3] == ["serve", "--stage", "scorer"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"  # resources.scorer: a GPU
    # It reads its model from the volume's shared models/ folder, read-only, never from a
    # job's store (no job folder is mounted).
    [models, scratch] = c["volumeMounts"]
    assert models == {"name": "weights", "mountPath": "/models", "subPath": "models",
                      "readOnly": True}
    assert scratch["name"] == "scratch"
    [weights, _] = svc["spec"]["template"]["spec"]["volumes"]
    assert weights["persistentVolumeClaim"]["claimName"] == "rlhfless-weights"
    # Without a models folder configured there is nothing to mount.
    bare = build_service(job("reward-model"), "scorer", namespace="ml", uid=UID,
                         settings=FunctionSettings(models_subpath=""))
    [c] = bare["spec"]["template"]["spec"]["containers"]
    assert [m["name"] for m in c["volumeMounts"]] == ["scratch"]


def test_service_fields_follow_the_spec() -> None:
    j = job("ppo-8-actors")
    settings = FunctionSettings(weights_pvc="weights-rwx", data_mount="/mnt/w")
    svc = build_service(j, "actor", namespace="ml", uid=UID, settings=settings)
    meta, template = svc["metadata"], svc["spec"]["template"]
    assert (svc["apiVersion"], svc["kind"]) == ("serving.knative.dev/v1", "Service")
    assert meta["labels"]["networking.knative.dev/visibility"] == "cluster-local"
    assert meta["ownerReferences"] == [{
        "apiVersion": "rlhfless.io/v1alpha1", "kind": "RLHFJob", "name": "ppo-8-actors",
        "uid": UID, "controller": True, "blockOwnerDeletion": True}]
    pod = template["spec"]
    assert pod["containerConcurrency"] == 1
    assert 0 < pod["timeoutSeconds"] <= 600
    [c] = pod["containers"]
    assert c["image"] == settings.gpu_image  # the actor has GPUs: the operator's GPU image
    assert c["command"] == ["rlhfless"]
    assert c["args"][:3] == ["serve", "--stage", "actor"]
    store = c["args"][c["args"].index("--store") + 1]
    assert store == "/mnt/w/store"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    # Only the job's own folder of the shared volume, and scratch space off the root fs.
    assert c["volumeMounts"] == [
        {"name": "weights", "mountPath": "/mnt/w", "subPath": f"jobs/ml/ppo-8-actors-{UID[:8]}"},
        {"name": "scratch", "mountPath": "/scratch"}]
    assert pod["volumes"] == [{"name": "weights",
                               "persistentVolumeClaim": {"claimName": "weights-rwx"}},
                              {"name": "scratch", "emptyDir": {}}]
    assert pod["automountServiceAccountToken"] is False
    ann = template["metadata"]["annotations"]
    assert ann[AUTOSCALING + "min-scale"] == "0"
    assert ann[AUTOSCALING + "max-scale"] == "8"  # maxActors
    assert ann[AUTOSCALING + "scale-to-zero-pod-retention-period"] == "120s"  # keepAliveS
    assert ann[AUTOSCALING + "window"] == "120s"
    assert ann[AUTOSCALING + "target"] == "1"
    # The function reads the job from the environment; it round-trips to the same job.
    env = {e["name"]: e.get("value") for e in c["env"]}
    document = json.loads(env[JOB_ENV])
    token = next(e["valueFrom"] for e in c["env"] if e["name"] == TOKEN_ENV)
    assert token == {"secretKeyRef": {"name": "ppo-8-actors-token", "key": "token"}}
    assert env["HOME"] == env["TMPDIR"] == "/scratch"
    assert document["metadata"] == {"name": "ppo-8-actors", "namespace": "ml"}
    assert parse_job(document).spec == j.spec


def test_cpu_only_stages_request_no_gpus_and_windows_stay_in_bounds() -> None:
    for svc in build_services(job("cpu-only"), namespace="ml", uid=UID):
        [c] = svc["spec"]["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        ann = svc["spec"]["template"]["metadata"]["annotations"]
        assert ann[AUTOSCALING + "window"] == "6s"  # keepAliveS 0, clamped to Knative's min
    long = build_service(job("long-keepalive"), "actor", namespace="ml", uid=UID)
    ann = long["spec"]["template"]["metadata"]["annotations"]
    assert ann[AUTOSCALING + "window"] == "3600s"
    assert ann[AUTOSCALING + "max-scale"] == "1"


def test_reward_stage_defaults_to_no_gpu() -> None:
    settings = FunctionSettings(image="r.example/rl@sha256:" + "c" * 64)
    svc = build_service(job("default-grpo"), "reward", namespace="ml", uid=UID,
                        settings=settings)
    [c] = svc["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert c["image"] == settings.image  # CPU stage: the CPU image, by digest when given
    # The reward function reads no weights: it mounts no store at all.
    assert [m["name"] for m in c["volumeMounts"]] == ["scratch"]


def test_only_the_stages_that_use_the_store_mount_it() -> None:
    mounts = {}
    for svc in build_services(job("ppo-8-actors"), namespace="ml", uid=UID):
        [c] = svc["spec"]["template"]["spec"]["containers"]
        stage = svc["metadata"]["labels"]["rlhfless.io/stage"]
        mounts[stage] = next((m.get("readOnly", False) for m in c["volumeMounts"]
                              if m["name"] == "weights"), None)
    # The learner publishes versions (and reads the driver's shards); the (vLLM) actor
    # exports versions beside the store; the reward function mounts none.
    assert mounts == {"actor": False, "reward": None, "learner": False}


def test_zero_initial_scale_only_where_the_cluster_allows_it() -> None:
    settings = FunctionSettings(allow_zero_initial_scale=True)
    svc = build_service(job("default-grpo"), "learner", namespace="ml", uid=UID,
                        settings=settings)
    assert svc["spec"]["template"]["metadata"]["annotations"][
        AUTOSCALING + "initial-scale"] == "0"
    assert check_webhook_rules(svc, allow_zero_initial_scale=True) == []
    assert any("initial-scale=0" in e for e in check_webhook_rules(svc))


def _with(service: dict[str, Any], **annotations: str) -> dict[str, Any]:
    out = copy.deepcopy(service)
    ann = out["spec"]["template"]["metadata"]["annotations"]
    for key, value in annotations.items():
        ann[AUTOSCALING + key.replace("_", "-")] = value
    return out


BASE = build_service(job("default-grpo"), "actor", namespace="ml", uid=UID)


@pytest.mark.parametrize("annotations,needle", [
    ({"max_scale": "1", "min_scale": "3"}, "max-scale=1 is less than min-scale=3"),
    ({"min_scale": "-1"}, "min-scale: -1 out of bounds"),
    ({"max_scale": "two"}, "max-scale: invalid value"),
    ({"activation_scale": "1"}, "activation-scale=1 must be greater than 1"),
    ({"activation_scale": "9", "max_scale": "4"}, "max-scale=4 is less than activation-scale"),
    ({"activation_scale": "2", "min_scale": "3", "max_scale": "4"},
     "min-scale=3 is greater than activation-scale=2"),
    ({"target": "0.001"}, "target 0.001 should be at least 0.01"),
    ({"target_utilization_percentage": "0"}, "out of bounds [1, 100]"),
    ({"target_utilization_percentage": "101"}, "out of bounds [1, 100]"),
    ({"window": "5s"}, "window: 5s out of bounds"),
    ({"window": "2h"}, "window: 2h out of bounds"),
    ({"window": "6500ms"}, "at most second precision"),
    ({"window": "soon"}, "window: invalid value"),
    ({"scale_to_zero_pod_retention_period": "61m"}, "out of bounds [0s, 1h0m0s]"),
    ({"initial_scale": "0"}, "initial-scale=0 not allowed by cluster"),
    ({"metric": "cpu"}, "invalid value 'cpu' for the KPA"),
])
def test_webhook_rules_catch_each_violation(annotations: dict[str, str], needle: str) -> None:
    errors = check_webhook_rules(_with(BASE, **annotations))
    assert len(errors) == 1 and needle in errors[0], errors


def test_webhook_rules_on_the_pod_spec() -> None:
    bad = copy.deepcopy(BASE)
    pod = bad["spec"]["template"]["spec"]
    pod["timeoutSeconds"] = 601
    pod["containerConcurrency"] = 1001
    pod["containers"][0]["readinessProbe"]["httpGet"]["port"] = 9999
    errors = check_webhook_rules(bad)
    assert len(errors) == 3
    assert any("timeoutSeconds: 601" in e for e in errors)
    assert any("containerConcurrency: 1001" in e for e in errors)
    assert any("readinessProbe: port" in e for e in errors)
    assert check_webhook_rules(BASE, max_scale_limit=2)  # max-scale 4 over a cluster limit 2
    assert check_webhook_rules(_with(BASE, max_scale="0"), max_scale_limit=10)


def test_go_durations() -> None:
    assert parse_go_duration("90s") == 90
    assert parse_go_duration("1m30s") == 90
    assert parse_go_duration("1h") == 3600
    assert parse_go_duration("1.5s") == 1.5
    assert parse_go_duration("0") == 0
    for bad in ("", "10", "1x", "s", "1s 2s"):
        with pytest.raises(ValueError):
            parse_go_duration(bad)


def test_job_names_must_fit_knative_names() -> None:
    assert name_errors("a" * MAX_JOB_NAME) == []
    assert name_errors("a" * (MAX_JOB_NAME + 1))
    assert name_errors("9lives")  # Knative Service names start with a letter
    for stage in STAGE_NAMES:
        longest = build_service(parse_spec({}, "a" * MAX_JOB_NAME), stage, namespace="n",
                                uid=UID)
        name = longest["metadata"]["name"]
        assert len(f"{name}-00001-private") <= 63


def test_webhook_rules_on_mounts_and_env() -> None:
    bad = copy.deepcopy(BASE)
    pod = bad["spec"]["template"]["spec"]
    pod["containers"][0]["volumeMounts"].append({"name": "scratch", "mountPath": "/tmp"})
    pod["containers"][0]["env"].append({"name": "PORT", "value": "1"})
    pod["volumes"].append({"name": "unused", "emptyDir": {}})
    errors = check_webhook_rules(bad)
    assert any("'/tmp' is a reserved path" in e for e in errors)
    assert any("'PORT' is a reserved environment variable" in e for e in errors)
    assert any("'unused' not mounted" in e for e in errors)
    assert any("target-burst-capacity" in e
               for e in check_webhook_rules(_with(BASE, target_burst_capacity="-2")))


def test_the_schema_checks_catch_mistakes() -> None:
    wrong_type = copy.deepcopy(BASE)
    wrong_type["spec"]["template"]["spec"]["containerConcurrency"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(knative_schema()).validate(wrong_type)
    typo = copy.deepcopy(BASE)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert pruned(typo, knative_schema()) == [".spec.template.spec.containers[0].readinesProbe"]
