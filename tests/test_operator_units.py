"""Pure parts of the operator: status transitions, metrics, RBAC mapping, validation, config."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from rbac_recorder import api_calls

from rlhfless.api.progress import PROGRESS_KEY, Progress, StepSummary, parse_progress
from rlhfless.api.spec import parse_spec
from rlhfless.knative.pods import FunctionSettings
from rlhfless.operator import status as st
from rlhfless.operator.config import OperatorConfig
from rlhfless.operator.decide import Action, DriverState, JobView, decide
from rlhfless.operator.handlers import JobState, immutable_changes, validate
from rlhfless.operator.metrics import METRIC_NAMES, OperatorMetrics
from rlhfless.operator.rbac import (
    CLUSTER_SCOPED,
    NAMESPACED_RULES,
    OPERATOR_RULES,
    role_rules,
)

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z"


CHECKPOINT = "jobs/ns/j-abcdef01/run/checkpoint.json"


def record(step: int, actors_alive: int = 0, reward: float = 0.5,
           **metrics: float) -> StepSummary:
    return StepSummary(step=step, reward=reward, gpu_seconds_total=12.34567,
                       weights_version=step, actors_alive=actors_alive, metrics=dict(metrics))


def test_transition_time_moves_only_when_a_condition_flips() -> None:
    started = st.started([], ["j-actor"], "j-driver", 0, 3, generation=1, now=T0)
    running = {c["type"]: c for c in started["conditions"]}["Running"]
    assert (running["status"], running["lastTransitionTime"]) == ("True", T0)
    stepped = st.step_done(started["conditions"], record(1), 3, CHECKPOINT, generation=1,
                           now=T1)
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
    patch = st.step_done([], record(4), 10, CHECKPOINT, generation=None, now=T0)
    assert patch["step"] == 4 and patch["weightsVersion"] == 4 and patch["reward"] == 0.5
    assert patch["costGpuSeconds"] == 12.346 and patch["checkpoint"] == CHECKPOINT
    assert "observedGeneration" not in patch
    # A status is JSON: a NaN reward is left out rather than breaking the patch.
    assert "reward" not in st.step_done([], record(5, reward=float("nan")), 10, CHECKPOINT,
                                        generation=None, now=T0)
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
    # One step as a driver pod published it (api.progress), as the operator exports it.
    m.observe_step("ns", "j", record(1, **{"timing_s/step": 3.0, "cost/gpu_seconds/actor": 4.0,
                                         "cost/cold_start_gpu_seconds/actor": 1.0,
                                         "idle_ratio/actor": 0.2, "sched/actors": 3.0,
                                         "sched/pred_mae_tokens": 7.5}))
    m.observe_actors("ns", "j", 1)
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
    rules = role_rules(OPERATOR_RULES)
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == OPERATOR_RULES
    # Namespaced: nothing cluster-scoped; never a read of Secrets or an escalation verb.
    assert NAMESPACED_RULES == OPERATOR_RULES - CLUSTER_SCOPED
    assert all(r[1] != "customresourcedefinitions" for r in NAMESPACED_RULES)
    assert {v for g, r, v in OPERATOR_RULES if r == "secrets"} == {"create"}
    assert not {v for *_, v in OPERATOR_RULES} & {"escalate", "bind", "impersonate", "*"}


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


def test_config_from_env() -> None:
    cfg = OperatorConfig.from_env({"RLHFLESS_WEIGHTS_PVC": "w",
                                   "RLHFLESS_ALLOW_ZERO_INITIAL_SCALE": "true",
                                   "RLHFLESS_FUNCTION_TIMEOUT_S": "300",
                                   "RLHFLESS_FUNCTION_IMAGE": "r.example/rl@sha256:" + "a" * 64,
                                   "RLHFLESS_INGRESS_NAMESPACES": "knative-serving, monitoring",
                                   "RLHFLESS_PROGRESS_INTERVAL_S": "2"})
    assert cfg.functions.weights_pvc == "w" and cfg.functions.allow_zero_initial_scale
    assert cfg.functions.timeout_s == 300 and cfg.progress_interval_s == 2
    assert cfg.functions.image == "r.example/rl@sha256:" + "a" * 64
    assert cfg.functions.ingress_namespaces == ("knative-serving", "monitoring")
    default = OperatorConfig.from_env({})
    assert default.functions.allow_zero_initial_scale is False
    assert default.functions.gpu_image == default.functions.image + "-gpu"
    # What the driver pod's runtime reads back is what the operator was configured with.
    back = FunctionSettings.from_env({e["name"]: e["value"]
                                      for e in cfg.functions.runtime_env()})
    assert (back.timeout_s, back.allow_zero_initial_scale) == (300, True)


@pytest.mark.parametrize("namespace,clusterwide", [(None, True), ("team", False)])
def test_operator_arguments(namespace: str | None, clusterwide: bool) -> None:
    from rlhfless.operator.main import operator_kwargs

    kwargs = operator_kwargs(namespace, "http://0.0.0.0:8080/healthz")
    assert kwargs["clusterwide"] is clusterwide and kwargs["standalone"] is True
    assert list(kwargs["namespaces"]) == ([] if namespace is None else [namespace])
    assert kwargs["liveness_endpoint"] == "http://0.0.0.0:8080/healthz"


def test_decide_starts_watches_stops_and_backs_off() -> None:
    idle = JobView(valid=True, steps_done=2, steps=5, max_retries=2)
    running = replace(idle, driver=DriverState.RUNNING)
    assert decide(JobView(valid=False)) is Action.INVALID
    assert decide(idle) is Action.START
    assert decide(running) is Action.WATCH
    # A spec change or suspend stops the driver (after its step); then suspend holds.
    assert decide(replace(running, driver_current=False)) is Action.STOP
    assert decide(replace(running, suspend=True)) is Action.STOP
    assert decide(replace(running, valid=False)) is Action.STOP
    assert decide(replace(idle, suspend=True)) is Action.SUSPEND
    # A stopping driver blocks everything: never two drivers on one store.
    for view in (replace(idle, driver=DriverState.STOPPING),
                 replace(idle, driver=DriverState.STOPPING, suspend=True, valid=False)):
        assert decide(view) is Action.WAIT
    # Done means done: no driver starts once every step is checkpointed.
    assert decide(replace(idle, steps_done=5)) is Action.SUCCEEDED
    assert decide(replace(running, steps_done=5)) is Action.SUCCEEDED
    # A finished Job goes before a new one starts.
    assert decide(replace(idle, driver=DriverState.FINISHED)) is Action.STOP
    assert decide(replace(idle, driver=DriverState.FINISHED, failures=1)) is Action.RETRY
    assert decide(replace(idle, failures=2)) is Action.RETRY
    assert decide(replace(idle, failures=3)) is Action.GIVE_UP
    # Precedence: an invalid spec wins over everything; suspend over a pending retry.
    assert decide(replace(idle, valid=False, suspend=True, failures=9)) is Action.INVALID
    assert decide(replace(idle, suspend=True, failures=9)) is Action.SUSPEND
    # Over budget: a driver that stopped (itself, at the budget) is reported and its
    # functions scaled to zero; a running one is left to stop itself after its step.
    assert decide(replace(idle, over_budget=True)) is Action.BUDGET
    assert decide(replace(idle, driver=DriverState.FINISHED, over_budget=True)) is Action.BUDGET
    assert decide(replace(idle, over_budget=True, failures=9)) is Action.BUDGET
    assert decide(replace(running, over_budget=True)) is Action.WATCH
    assert decide(replace(running, over_budget=True, driver_current=False)) is Action.STOP
    assert decide(replace(idle, over_budget=True, suspend=True)) is Action.SUSPEND
    assert decide(replace(idle, over_budget=True, steps_done=5)) is Action.SUCCEEDED


def test_progress_from_a_driver_is_parsed_as_untrusted_input() -> None:
    good = Progress(state="running", steps=3, checkpoint_step=2, records=[record(2)])
    assert parse_progress({PROGRESS_KEY: good.dump()}) == good
    for bad in (None, {}, {PROGRESS_KEY: "not json"}, {PROGRESS_KEY: '{"state": "pwned"}'},
                {PROGRESS_KEY: '{"checkpoint_step": -4}'},
                {PROGRESS_KEY: '{"error": "' + "x" * 100000 + '"}'},
                {PROGRESS_KEY: '{"records": [' + ",".join(['{"step": 1, "reward": 0, '
                 '"gpu_seconds_total": 0, "weights_version": 0}'] * 100) + "]}"}):
        assert parse_progress(bad) == Progress()


def test_the_spend_a_driver_publishes_is_the_ledger_the_operator_judges() -> None:
    from rlhfless.api.spec import BudgetSpec
    from rlhfless.cost import Ledger, check_budget, cost_status

    rows = [{"cost/gpu_seconds": 40.0 + k, "cost/dollars": 0.1 * k,
             "cost/gpu_seconds/actor": 30.0, "cost/gpu_seconds/learner": 10.0 + k,
             "cost/dollars/actor": 0.05, "cost/serverful_gpu_seconds": 80.0}
            for k in range(5)]
    ledger = Ledger.of(rows)
    published = Progress(cost=ledger.report())
    back = Ledger.from_report(parse_progress({PROGRESS_KEY: published.dump()}).cost)
    assert cost_status(back) == cost_status(ledger)
    budget = BudgetSpec(max_gpu_hours=(ledger.gpu_seconds + 40) / 3600)
    assert check_budget(back, budget) == check_budget(ledger, budget)
    assert check_budget(back, budget).exceeded  # the next step (~44 GPU-s) would cross it
    # Untrusted: negative, infinite or oversized spend reads as no progress at all.
    for bad in ('{"cost": {"gpu_seconds": -1}}', '{"cost": {"gpu_seconds": 1e999}}',
                '{"cost": {"stage_dollars": {' + ",".join(f'"s{i}": 1' for i in range(99))
                + "}}}", '{"cost": {"recent": [[1, 2]' + ", [1, 2]" * 20 + "]}}"):
        assert parse_progress({PROGRESS_KEY: bad}) == Progress()


def test_failures_count_runs_in_a_row_once_each() -> None:
    from rlhfless.operator.runs import Failures

    f = Failures()
    f.on_spec(1)
    fin = DriverState.FINISHED
    assert not f.judge(DriverState.RUNNING, "a", False, "", 3, 1) and f.run_from == 3
    assert f.judge(fin, "a", True, "boom", 3, 1) and (f.count, f.error) == (1, "boom")
    assert not f.judge(fin, "a", True, "boom", 3, 1)  # the same Job is judged once
    assert f.judge(fin, "b", True, "again", 3, 1) and f.count == 2
    f.retry_due = True
    assert f.pending == 0  # a retry is due: decide starts a driver
    f.started(3)
    assert f.judge(fin, "c", True, "later", 5, 1) and f.count == 1  # it made progress
    assert not f.judge(fin, "d", False, "", 6, 1) and f.count == 1  # a clean exit
    f.on_spec(2)
    assert f.count == 0 and f.pending == 0  # a spec change starts over


def test_reported_steps_are_news_once_and_again_after_a_fallback() -> None:
    from rlhfless.operator.runs import Reported

    r = Reported(step=2)  # an earlier operator reported up to step 2
    progress = Progress(records=[record(1), record(2), record(3), record(4)])
    assert [s.step for s in r.news(progress)] == [3, 4] and r.news(progress) == []
    # A driver that fell back to step 1 (a corrupt version) runs step 2 again.
    assert [s.step for s in r.news(Progress(records=[record(2)]))] == [2]
    notice = Progress(notice="corrupt version 4: fell back")
    assert r.new_notice(notice) == "corrupt version 4: fell back"
    assert r.new_notice(notice) is None
