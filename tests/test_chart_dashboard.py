"""The Grafana dashboard: valid, complete, and only querying series that are exported.

Every metric name in the dashboard's PromQL must be one the operator or the stage functions
actually expose (their METRIC_NAMES, and the exposition prometheus_client produces for
their registries: counters as `_total`, histograms as `_bucket/_sum/_count`) or one the
chart's recording rules record from them, with labels those series carry (or Prometheus
target labels). tests/test_prometheus_e2e.py asks a real Prometheus every query.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from helm_chart import CHART, NON_DEFAULT_VALUES, one, render
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from rlhfless.functions import metrics as function_metrics
from rlhfless.operator import metrics as operator_metrics

DASHBOARD = json.loads((CHART / "files" / "dashboard.json").read_text())
# Labels Prometheus (Operator) attaches to every scraped series.
TARGET_LABELS = {"instance", "job", "namespace", "pod", "container", "service", "endpoint"}
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
GRAFANA_BUILTINS = {var.removeprefix("$") for var in GRAFANA_VARS}
# A metric name, raw (rlhfless_x) or recorded (level:rlhfless_x:operations).
METRIC = re.compile(r"(?<![\w:])(?:[a-z_]+:)?rlhfless_[a-z0-9_]+(?::[a-z0-9_]+)?")
RULES = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
RECORDED = {rule["record"]: rule["expr"] for group in RULES["groups"]
            for rule in group["rules"] if "record" in rule}

# The panels the dashboard exists for, and the series each must show.
REQUIRED_PANELS = {
    "Reward": {"rlhfless_reward"},
    "Step time": {"rlhfless_step_seconds_bucket"},
    "Step time per stage": {"rlhfless_function_request_seconds_sum"},
    "GPU-seconds per stage": {"rlhfless_gpu_seconds_total"},
    "Cumulative GPU-seconds per stage": {"rlhfless_gpu_seconds_total"},
    "Actors alive": {"rlhfless_actors_alive"},
    "Idle ratio per stage": {"rlhfless_idle_ratio"},
    "Length-prediction error": {"rlhfless_length_prediction_mae_tokens"},
    "Scheduling decisions": {"rlhfless_scheduling_actors_chosen"},
    "Dollars per stage": {"rlhfless_cost_dollars_total"},
    "Cumulative dollars per stage": {"rlhfless_cost_dollars_total"},
    "GPU-seconds by use per stage": {"rlhfless_gpu_seconds_by_use_total"},
    "Serverless vs serverful GPU-seconds": {"rlhfless_gpu_seconds_total",
                                            "rlhfless_serverful_gpu_seconds_total"},
    "Budget used": {"rlhfless_budget_used_ratio"},
}


def exposed(metrics_obj: Any) -> dict[str, set[str]]:
    """Sample name -> label names, as /metrics shows them once every metric has a child."""
    for metric in vars(metrics_obj).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))
    out: dict[str, set[str]] = {}
    text = generate_latest(metrics_obj.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def recorded_labels(expr: str) -> set[str]:
    """Labels of a recorded series: its aggregation's `by` labels (`le` is consumed by a
    histogram_quantile around it)."""
    match = re.search(r"\bby \(([^)]*)\)", expr)
    assert match, f"recording rule {expr!r} does not aggregate by job labels"
    labels = {label.strip() for label in match.group(1).split(",")}
    return labels - {"le"} if expr.startswith("histogram_quantile") else labels


OPERATOR_SERIES = exposed(operator_metrics.OperatorMetrics())
FUNCTION_SERIES = exposed(function_metrics.FunctionMetrics("actor"))
RECORDED_SERIES = {name: recorded_labels(expr) for name, expr in RECORDED.items()}
SERIES = {**OPERATOR_SERIES, **FUNCTION_SERIES, **RECORDED_SERIES}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def listed(name: str) -> bool:
    """Is `name` one of the METRIC_NAMES (a histogram listed by its base name) or recorded?"""
    names = set(operator_metrics.METRIC_NAMES) | set(function_metrics.METRIC_NAMES)
    return (name in names or name in RECORDED
            or any(name == base + s for base in names for s in HISTOGRAM_SUFFIXES))


def raw_names(name: str) -> set[str]:
    """The exported series a name reads: itself, or what its recording rule reads."""
    if name not in RECORDED:
        return {name}
    return {n for inner in METRIC.findall(RECORDED[name]) for n in raw_names(inner)}


def panels(node: dict[str, Any] = DASHBOARD) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from panels(panel)


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    for panel in panels():
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_]+)\)", query)
            assert match, f"variable {var['name']}: unsupported query {query!r}"
            yield f"variable {var['name']!r}", match.group(1)


def promql(expr: str) -> str:
    """Grafana's variables replaced by values PromQL accepts."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?([a-z_]+)\}?", ".*", expr)


# -- metric names --------------------------------------------------------------------------

def test_metric_names_lists_match_what_is_exported() -> None:
    for module, series in ((operator_metrics, OPERATOR_SERIES),
                           (function_metrics, FUNCTION_SERIES)):
        for name in module.METRIC_NAMES:
            assert name in series or name + "_count" in series, (
                f"{module.__name__}.METRIC_NAMES has {name}, not exported")


def test_every_metric_in_the_dashboard_is_exported() -> None:
    used = set()
    for where, expr in queries():
        for name in METRIC.findall(expr):
            used |= raw_names(name)
            assert name in SERIES, f"{where}: {name} is not exported by operator or functions"
            assert listed(name), f"{where}: {name} is missing from METRIC_NAMES"
            for raw in raw_names(name):
                assert raw in SERIES, f"{where}: {name} is recorded from {raw}, not exported"
    # The dashboard shows every operator metric (nothing the operator exports goes unseen).
    for name in operator_metrics.METRIC_NAMES:
        assert name in used or any(name + s in used for s in HISTOGRAM_SUFFIXES), name


def test_dashboard_has_the_required_panels() -> None:
    by_title = {p["title"]: p for p in panels()}
    for title, series in REQUIRED_PANELS.items():
        assert title in by_title, f"missing panel {title!r}"
        exprs = " ".join(t["expr"] for t in by_title[title]["targets"])
        shown = {raw for name in METRIC.findall(exprs) for raw in raw_names(name)}
        assert series <= shown, (title, exprs)
        assert by_title[title].get("description"), f"{title!r} has no description"
    stage_panels = [t for t in REQUIRED_PANELS if "per stage" in t]
    for title in stage_panels:  # per-stage panels split or label by stage
        exprs = " ".join(t["expr"] + t["legendFormat"] for t in by_title[title]["targets"])
        assert "stage" in exprs, title
    for title in ("Cumulative GPU-seconds per stage", "Cumulative dollars per stage"):
        cumulative = " ".join(t["expr"] for t in by_title[title]["targets"])
        assert "rate(" not in cumulative and "increase(" not in cumulative
    # The waste split shows each use of each stage.
    split = by_title["GPU-seconds by use per stage"]["targets"][0]
    assert "by (stage, use)" in split["expr"] and "{{use}}" in split["legendFormat"]


# -- PromQL --------------------------------------------------------------------------------

def _walk(node: Any) -> Iterator[Any]:
    yield node
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (str, int, float)):
            yield from _walk(child)
    for arg in getattr(node, "args", None) or []:
        yield from _walk(arg)


def test_promql_parses_and_uses_labels_the_series_have() -> None:
    pp = pytest.importorskip("promql_parser", reason="promql-parser not installed")
    for where, expr in queries():
        try:
            tree = pp.parse(promql(expr))
        except Exception as exc:  # the parser raises plain ValueError/RuntimeError
            raise AssertionError(f"{where}: cannot parse {expr!r}: {exc}") from exc
        nodes = list(_walk(tree))
        selectors = [n for n in nodes if isinstance(n, pp.VectorSelector)]
        assert selectors, f"{where}: no metric selected"
        available: set[str] = set(TARGET_LABELS)
        for sel in selectors:
            labels = SERIES.get(sel.name)
            assert labels is not None, f"{where}: {sel.name} not exported"
            available |= labels
            for matcher in sel.matchers.matchers:
                assert matcher.name in labels | TARGET_LABELS, (
                    f"{where}: {sel.name} has no label {matcher.name!r}")
        for agg in (n for n in nodes if isinstance(n, pp.AggregateExpr)):
            if agg.modifier is not None:
                unknown = set(agg.modifier.labels) - available
                assert not unknown, f"{where}: aggregates by unknown labels {unknown}"
        for call in (n for n in nodes if isinstance(n, pp.Call)):
            name = call.func.name
            inner = [n.name for n in _walk(call) if isinstance(n, pp.VectorSelector)]
            if name in ("rate", "irate", "increase"):  # only counters (and histogram parts)
                assert all(s.endswith(("_total", *HISTOGRAM_SUFFIXES)) for s in inner), (
                    f"{where}: {name}() over a gauge {inner}")
            if name == "histogram_quantile":
                assert all(any(r.endswith("_bucket") for r in raw_names(s)) for s in inner), where
                assert "by (le" in expr, f"{where}: histogram_quantile must keep `le`"


def test_every_query_filters_by_the_dashboard_variables() -> None:
    """Per-job series honour the namespace/job pickers (rlhfless_jobs has neither label)."""
    for where, expr in queries():
        if not where.startswith("panel"):
            continue
        for name in set(METRIC.findall(expr)):
            if {"namespace", "job"} <= SERIES[name] or name in FUNCTION_SERIES:
                pattern = re.escape(name) + r'\{[^}]*namespace=~"\$namespace"[^}]*job=~"\$job"'
                assert re.search(pattern, expr), f"{where}: {name} not filtered by $namespace/$job"


# -- dashboard structure -------------------------------------------------------------------

def test_dashboard_structure() -> None:
    assert DASHBOARD["uid"] and DASHBOARD["title"] == "RLHFless"
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables
    cells: set[tuple[int, int]] = set()
    for panel in panels():
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps another panel"
                cells.add((x, y))
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                used = set(re.findall(r"\$\{?([a-z_]+)", target["expr"])) - GRAFANA_BUILTINS
                assert used <= variables, f"{panel['title']!r} uses undefined {used - variables}"


@pytest.mark.parametrize("values", [{}, NON_DEFAULT_VALUES], ids=["default", "non-default"])
def test_dashboard_configmap_embeds_the_file(values: dict[str, Any]) -> None:
    cm = one(render(values), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["rlhfless.json"]) == DASHBOARD
    expected_ns = values.get("dashboard", {}).get("namespace") or "rlhfless"
    assert cm["metadata"]["namespace"] == expected_ns
    if values:
        assert cm["metadata"]["annotations"] == {"grafana_folder": "RLHF"}


def test_dashboard_can_be_switched_off() -> None:
    assert not [d for d in render({"dashboard": {"enabled": False}}) if d["kind"] == "ConfigMap"]
