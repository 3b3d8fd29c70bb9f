"""The chart's alert and recording rules: valid for Prometheus (`promtool check rules`), each
alert unit-tested firing and not firing (`promtool test rules`), and shipped verbatim as the
chart's PrometheusRule. promtool comes with Debian's `prometheus` package (.ci/run)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import CHART, NON_DEFAULT_VALUES, PROMETHEUS_OPERATOR_API, by_kind, one, render

RULES_FILE = CHART / "files" / "prometheus-rules.yaml"
UNIT_TESTS = Path(__file__).parent / "data" / "prometheus-rules-test.yaml"
RULES = yaml.safe_load(RULES_FILE.read_text())
ALERTS = [r for g in RULES["groups"] for r in g["rules"] if "alert" in r]
RECORDS = [r for g in RULES["groups"] for r in g["rules"] if "record" in r]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not found: install Debian's prometheus package "
                    "(apt-get install --no-install-recommends prometheus; .ci/run does)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120,
                          cwd=UNIT_TESTS.parent)


def test_promtool_accepts_the_rules() -> None:
    proc = promtool("check", "rules", str(RULES_FILE))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDS)} rules found" in proc.stdout


def test_alert_unit_tests_pass() -> None:
    proc = promtool("test", "rules", UNIT_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases: dict[str, list[list[Any]]] = {}
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    assert [(UNIT_TESTS.parent / f).resolve() for f in tests["rule_files"]] == [
        RULES_FILE.resolve()]
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(case.get("exp_alerts") or [])
    for alert in ALERTS:
        name = alert["alert"]
        seen = cases.get(name, [])
        assert any(seen), f"{name}: no unit test where it fires"
        assert any(not exp for exp in seen), f"{name}: no unit test where it stays quiet"
        assert alert["labels"]["severity"] in ("info", "warning", "critical"), name
        assert {"summary", "description"} <= set(alert["annotations"]), name


def test_every_recording_rule_is_read_by_the_dashboard_or_an_alert() -> None:
    dashboard = (CHART / "files" / "dashboard.json").read_text()
    alerts = json.dumps(ALERTS)
    for rule in RECORDS:
        name = rule["record"]
        assert re.fullmatch(r"[a-z_]+:rlhfless_[a-z0-9_]+:[a-z0-9_]+", name), (
            f"{name}: not named level:metric:operations")
        assert name in dashboard or name in alerts, f"{name} is recorded but never read"


def test_rules_never_group_by_per_pod_or_per_request_labels() -> None:
    """Rules aggregate to (namespace, job[, stage, outcome]): pod and instance churn (a
    restarted operator, scaled functions) must not split a job's series."""
    allowed = {"namespace", "job", "stage", "outcome", "le"}
    for rule in ALERTS + RECORDS:
        for labels in re.findall(r"\b(?:by|on) \(([^)]*)\)", rule["expr"]):
            used = {label.strip() for label in labels.split(",")}
            assert used <= allowed, (rule.get("alert") or rule.get("record"), used - allowed)


# -- the chart ------------------------------------------------------------------------------

def test_chart_ships_the_rules_file_verbatim() -> None:
    rule = one(render(NON_DEFAULT_VALUES, PROMETHEUS_OPERATOR_API), "PrometheusRule")
    assert rule["spec"] == RULES
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert rule["metadata"]["namespace"] == "rlhfless"
    default = one(render({}, PROMETHEUS_OPERATOR_API), "PrometheusRule")
    assert default["spec"] == RULES


def test_prometheus_rule_renders_only_when_enabled_and_served() -> None:
    assert not by_kind(render(), "PrometheusRule")  # monitoring.coreos.com/v1 not served
    disabled = {"metrics": {"prometheusRule": {"enabled": False}}}
    assert not by_kind(render(disabled, PROMETHEUS_OPERATOR_API), "PrometheusRule")
