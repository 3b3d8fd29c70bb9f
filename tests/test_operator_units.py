"""Pure parts of the operator: status transitions, metrics, RBAC mapping, validation, config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from rbac_recorder import api_calls

from rlhfless.api.spec import parse_spec
from rlhfless.driver.records import StepRecord
from rlhfless.operator import status as st
from rlhfless.operator.config import OperatorConfig
from rlhfless.operator.handlers import JobState, immutable_changes, validate
from rlhfless.operator.metrics import METRIC_NAMES, OperatorMetrics
from rlhfless.operator.rbac import OPERATOR_RULES, cluster_role_rules
from rlhfless.runtime.base import InstanceUsage

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z"


def record(step: int, **metrics: float) -> StepRecord:
    return StepRecord(step, dict(metrics), reward_mean=0.5, gpu_seconds_total=12.34567,
                      weights_version=step, checkpoint="/run/checkpoint.json")


def test_transition_time_moves_only_when_a_condition_flips() -> None:
    started = st.started([], ["j-actor"], 0, 3, generation=1, now=T0)
    running = {c["type"]: c for c in started["conditions"]}["Running"]
    assert (running["status"], running["lastTransitionTime"]) == ("True", T0)
    stepped = st.step_done(started["conditions"], record(1), 3, generation=1, now=T1)
    running = {c["type"]: c for c in stepped["conditions"]}["Running"]
    assert (running["reason"], running["lastTransitionTime"]) == ("StepCompleted", T0)
    done = st.succeeded(stepped["conditions"], 3, generation=2, now=T2)
    conds = {c["type"]: c for c in done["conditions"]}
    assert conds["Running"]["status"] == "False" and conds["Running"]["lastTransitionTime"] == T2
    assert conds["Complete"]["status"] == "True" and conds["Complete"]["observedGeneration"] == 2
    assert conds["Ready"]["lastTransitionTime"] == T0  # untouched types keep their entry
    assert [c["type"] for c in done["conditions"]] == ["Ready", "Running", "Suspended",
                                                       "Complete"]
    assert done["phase"] == "Succeeded" and done["observedGeneration"] == 2


def test_status_fields_of_a_step() -> None:
    patch = st.step_done([], record(4), 10, generation=None, now=T0)
    assert patch["step"] == 4 and patch["weightsVersion"] == 4 and patch["reward"] == 0.5
    assert patch["costGpuSeconds"] == 12.346
    assert "observedGeneration" not in patch
    invalid = st.invalid_spec([], ["spec.steps: bad", "spec.seed: bad"], 3, now=T0)
    ready = st.condition(invalid, "Ready")
    assert ready is not None and ready["reason"] == "InvalidSpec"
    assert ready["message"] == "invalid spec: spec.steps: bad; spec.seed: bad"
    failed = st.failed([], "boom " * 10000, 1, retry_in_s=30, now=T0)
    assert len(st.condition(failed, "Ready")["message"]) <= 32768


def test_metric_names_are_exactly_what_is_exported() -> None:
    m = OperatorMetrics()
    m.set_phase("ns", "j", "Running")
    m.driver_started("ns", "j", ("actor",))
    m.observe_step("ns", "j", record(1, **{"timing_s/step": 3.0, "cost/gpu_seconds/actor": 4.0,
                                         "cost/cold_start_gpu_seconds/actor": 1.0,
                                         "idle_ratio/actor": 0.2, "sched/actors": 3.0,
                                         "sched/pred_mae_tokens": 7.5}))
    m.observe_usage("ns", "j", [InstanceUsage("actor", "a", 1, 0.0, None, 0.0),
                                InstanceUsage("actor", "b", 1, 0.0, 5.0, 0.0)])
    text = generate_latest(m.registry).decode()
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    exported = {n for n in exported if not n.endswith("_created")}  # client-library extras
    assert exported == set(METRIC_NAMES)
    assert all(n.startswith("rlhfless_") for n in METRIC_NAMES)
    assert 'rlhfless_gpu_seconds_total{job="j",namespace="ns",stage="actor"} 4.0' in text
    assert 'rlhfless_actors_alive{job="j",namespace="ns"} 1.0' in text
    assert 'rlhfless_length_prediction_mae_tokens{job="j",namespace="ns"} 7.5' in text
    assert 'rlhfless_scheduling_actors_chosen{job="j",namespace="ns"} 3.0' in text
    m.forget("ns", "j")
    text = generate_latest(m.registry).decode()
    assert 'job="j"' not in text
    assert 'rlhfless_jobs{phase="Running"} 0.0' in text


def test_api_calls_map_requests_to_rbac_verbs() -> None:
    def req(action: str, method: str, group: str | None, plural: str | None,
            sub: str | None = None, name: str | None = "x") -> SimpleNamespace:
        resource = None if group is None else SimpleNamespace(group=group, plural=plural)
        return SimpleNamespace(action=action, method=method, resource=resource,
                               subresource=sub, name=name)

    calls = api_calls([
        req("LIST", "GET", "rlhfless.io", "rlhfjobs", name=None),
        req("FETCH", "GET", "serving.knative.dev", "services"),
        req("UPDATE", "PATCH", "rlhfless.io", "rlhfjobs", "status"),
        req("UPDATE", "PUT", "", "configmaps"),
        req("DELETE", "DELETE", "", "pods", name=None),
        req("LIST", "GET", None, None),  # discovery
    ])
    assert calls == {("rlhfless.io", "rlhfjobs", "list"), ("serving.knative.dev", "services",
                     "get"), ("rlhfless.io", "rlhfjobs/status", "patch"),
                     ("", "configmaps", "update"), ("", "pods", "deletecollection")}
    rules = cluster_role_rules(OPERATOR_RULES)
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == OPERATOR_RULES


def test_validate_names_every_bad_field() -> None:
    job, errors = validate({"steps": 0, "algorithm": {"clipEps": 2}}, "ok-name", "ns")
    assert job is None
    assert sorted(e.split(":")[0] for e in errors) == ["spec.algorithm.clipEps", "spec.steps"]
    job, errors = validate({}, "Bad_Name", "ns")
    assert job is None and len(errors) == 1 and errors[0].startswith("metadata.name")
    job, errors = validate(None, "fine", "ns")
    assert errors == [] and job is not None and job.metadata.namespace == "ns"


def test_immutable_fields() -> None:
    before = parse_spec({}, "j")
    assert immutable_changes(None, before) == []
    assert immutable_changes(before, parse_spec({"steps": 99, "suspend": True}, "j")) == []
    changed = parse_spec({"model": {"tiny": {"nLayer": 3}}, "algorithm": {"name": "ppo"}}, "j")
    assert [e.split(":")[0] for e in immutable_changes(before, changed)] == [
        "spec.model", "spec.algorithm.name"]


def test_job_state_version_moves_only_on_real_changes() -> None:
    state = JobState()
    job = parse_spec({}, "j")
    state.update(job, None, ["j-actor"], 1)
    assert state.version == 1
    state.update(parse_spec({}, "j"), None, ["j-actor"], 1)  # a handler re-run
    assert state.version == 1
    state.update(parse_spec({"suspend": True}, "j"), None, ["j-actor"], 2)
    assert state.version == 2 and state.accepted is not None
    state.update(None, ["spec.steps: bad"], [], 3)
    assert state.version == 3 and state.accepted is not None and state.accepted.spec.suspend


def test_config_from_env_and_job_paths() -> None:
    cfg = OperatorConfig.from_env({"RLHFLESS_DATA_DIR": "/mnt/data",
                                   "RLHFLESS_WEIGHTS_PVC": "w",
                                   "RLHFLESS_ALLOW_ZERO_INITIAL_SCALE": "true",
                                   "RLHFLESS_FUNCTION_TIMEOUT_S": "300"})
    assert cfg.functions.weights_pvc == "w" and cfg.functions.allow_zero_initial_scale
    assert cfg.functions.timeout_s == 300
    run_dir, store_dir = cfg.job_paths("ns", "job", "abcdef0123")
    assert run_dir == Path("/mnt/data/jobs/ns/job-abcdef01/run")
    assert store_dir == Path("/mnt/data/jobs/ns/job-abcdef01/store")
    assert OperatorConfig.from_env({}).functions.allow_zero_initial_scale is False


@pytest.mark.parametrize("namespace,clusterwide", [(None, True), ("team", False)])
def test_operator_arguments(namespace: str | None, clusterwide: bool) -> None:
    from rlhfless.operator.main import operator_kwargs

    kwargs = operator_kwargs(namespace, "http://0.0.0.0:8080/healthz")
    assert kwargs["clusterwide"] is clusterwide and kwargs["standalone"] is True
    assert list(kwargs["namespaces"]) == ([] if namespace is None else [namespace])
    assert kwargs["liveness_endpoint"] == "http://0.0.0.0:8080/healthz"


def test_decide_reports_suspends_finishes_drives_and_backs_off() -> None:
    from rlhfless.operator.decide import Action, JobView, decide

    running = JobView(valid=True, steps_done=2, steps=5, max_retries=2)
    assert decide(JobView(valid=False)) is Action.INVALID
    assert decide(replace(running, suspend=True)) is Action.SUSPEND
    # Done means done: no driver runs once every step is checkpointed.
    assert decide(replace(running, steps_done=5)) is Action.SUCCEEDED
    assert decide(running) is Action.DRIVE
    assert decide(replace(running, failures=1)) is Action.RETRY
    assert decide(replace(running, failures=2)) is Action.RETRY
    assert decide(replace(running, failures=3)) is Action.GIVE_UP
    # Precedence: an invalid spec wins over everything; suspend over a pending retry.
    assert decide(replace(running, valid=False, suspend=True, failures=9)) is Action.INVALID
    assert decide(replace(running, suspend=True, failures=9)) is Action.SUSPEND
