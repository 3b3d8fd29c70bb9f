"""A real Prometheus answers every query of the Grafana dashboard.

Debian's `prometheus` runs as a plain process (its own config, storage in tmp, a loopback
port, 1 s scrapes, the chart's rules loaded). It scrapes a real `rlhfless run
--metrics-port 0` of a tiny job through the prometheus.yml that run writes (the job's
metrics and every function instance, found through prometheus_targets.json) and the real
operator under kmock (a fake driver reporting steps, its metrics on a port). Once both have
run some steps, every dashboard query, with its variables substituted as Grafana would,
must return a series with a value: a query that can never return data is a bug in the
dashboard or in the exporter. Waits are on conditions with generous deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import tiny_job_yaml
from test_operator_kmock import TINY, Trace, running

from rlhfless.operator.metrics import OperatorMetrics
from rlhfless.runtime.discovery import CHART_RULES, PROMETHEUS_CONFIG_FILE, TARGETS_FILE

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus binary not found: install Debian's prometheus "
    "package (apt-get install --no-install-recommends prometheus; .ci/run does)")

DASHBOARD = json.loads((CHART_RULES.parent / "dashboard.json").read_text())
SCRAPE_S = 1
# Grafana: $__interval = range / max data points, at least the scrape interval (1 s for a
# minute of data); $__rate_interval = max($__interval + scrape interval, 4 x scrape interval).
INTERVAL_S = SCRAPE_S
RATE_INTERVAL_S = max(INTERVAL_S + SCRAPE_S, 4 * SCRAPE_S)
DEADLINE_S = 300.0  # for everything to show up on a loaded 2-core machine
# Labels a scraped rlhfless series may carry (its own, plus the scrape target's instance).
SERIES_LABELS = {"__name__", "namespace", "job", "stage", "outcome", "phase", "le", "use",
                 "instance"}
LOCAL_JOB = "e2e"
JOB_YAML = tiny_job_yaml(
    LOCAL_JOB, 100000, scheduling="{actors: 1, maxActors: 1, keepAliveS: 120}",
    # far from spent: the budget panel has a series to show
    extra="  budget: {maxGpuHours: 1000}\n")


# -- the dashboard, as Grafana reads it -------------------------------------------------------

def _panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from _panels(panel)


def dashboard_queries() -> list[tuple[str, str, bool]]:
    """(where, PromQL, instant) for every panel target."""
    return [(f"{panel['title']!r} {t['refId']}", t["expr"], bool(t.get("instant")))
            for panel in _panels(DASHBOARD) for t in panel.get("targets", [])]


def dashboard_variables() -> list[tuple[str, str, str]]:
    """(name, label, selector) of every label_values() variable, in dependency order."""
    out = []
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_]+)\)", query)
        assert match, f"variable {var['name']}: unsupported query {query!r}"
        out.append((var["name"], match.group(2), match.group(1)))
    return out


def regex_value(values: list[str]) -> str:
    """A multi-value variable inside `=~"..."`, formatted as Grafana does: (a|b)."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, variables: dict[str, list[str]], range_s: float) -> str:
    builtins = {"__rate_interval": f"{RATE_INTERVAL_S}s", "__interval": f"{INTERVAL_S}s",
                "__range": f"{max(1, int(range_s))}s"}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in builtins:
            return builtins[name]
        assert name in variables, f"undefined dashboard variable ${name} in {expr!r}"
        return regex_value(variables[name])

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def has_value(result: list[dict[str, Any]]) -> bool:
    """At least one series with at least one finite sample (what a panel would draw)."""
    for series in result:
        samples = series.get("values") or [series["value"]]
        if any(math.isfinite(float(v)) for _, v in samples):
            return True
    return False


# -- processes --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process(cmd: list[str], log: Path, **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class Prometheus:
    def __init__(self, url: str, client: httpx.AsyncClient):
        self.url, self.client = url, client

    async def api(self, path: str, **params: Any) -> Any:
        reply = await self.client.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = reply.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    async def ready(self) -> bool:
        try:
            return (await self.client.get(f"{self.url}/-/ready", timeout=5)).status_code == 200
        except httpx.TransportError:
            return False


async def wait_for(what: str, check: Any, deadline: float, interval: float = 0.5) -> Any:
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


# -- the test ---------------------------------------------------------------------------------

async def test_every_dashboard_query_returns_data(tmp_path: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    job_file, run_dir = tmp_path / "job.yaml", tmp_path / "run"
    job_file.write_text(JOB_YAML)
    run_log, prom_log = tmp_path / "run.log", tmp_path / "prometheus.log"
    op_metrics = OperatorMetrics()
    op_server = op_metrics.serve(0, addr="127.0.0.1")
    cmd = [sys.executable, "-m", "rlhfless.cli", "run", str(job_file), "--run-dir",
           str(run_dir), "--metrics-port", "0"]
    try:
        with process(cmd, run_log, env={**os.environ, "COLUMNS": "200"}) as run:
            # The run writes its prometheus.yml before starting any function: use it as a
            # user would, with faster scrapes, and add the operator's endpoint.
            generated = run_dir / PROMETHEUS_CONFIG_FILE

            async def config_written() -> bool:
                assert run.poll() is None, log_tail(run_log)
                return generated.exists()

            await wait_for("the run's prometheus.yml", config_written, deadline)
            config = yaml.safe_load(generated.read_text())
            assert config["rule_files"] == [str(CHART_RULES)]
            config["global"] = {"scrape_interval": f"{SCRAPE_S}s",
                                "evaluation_interval": f"{SCRAPE_S}s"}
            config["scrape_configs"].append({
                "job_name": "rlhfless-operator", "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{op_server.port}"]}]})
            (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
            prom_port = free_port()
            assert PROMETHEUS is not None
            prom_cmd = [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}"]
            with process(prom_cmd, prom_log) as prom_proc:
                async with (httpx.AsyncClient() as client,
                            running(tmp_path / "op", Trace(), step_s=0.5,
                                    metrics=op_metrics) as cluster):
                    await cluster.create_job("demo", {**TINY, "steps": 100000})
                    prom = Prometheus(f"http://127.0.0.1:{prom_port}", client)

                    async def prom_ready() -> bool:
                        assert prom_proc.poll() is None, log_tail(prom_log)
                        return await prom.ready()

                    await wait_for("Prometheus /-/ready", prom_ready, deadline)
                    started = time.time()
                    missing, variables = await _until_every_query_answers(
                        prom, run, run_log, started, deadline)
                    assert not missing, "dashboard queries without data:\n" + "\n".join(
                        f"  {where}: {expr}" for where, expr in missing)
                    assert {"demo", LOCAL_JOB} <= set(variables["job"])
                    assert "default" in variables["namespace"]
                    await _check_targets_and_labels(prom, run_dir, started)
            # Ctrl-C: the run stops after its step; nothing is left for Prometheus to find.
            os.killpg(run.pid, signal.SIGINT)
            assert run.wait(timeout=120) == 130, log_tail(run_log)
            assert "Traceback" not in run_log.read_text()
            assert json.loads((run_dir / TARGETS_FILE).read_text()) == []
    finally:
        op_server.close()


async def _until_every_query_answers(
    prom: Prometheus, run: subprocess.Popen[bytes], run_log: Path, started: float,
    deadline: float,
) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """Ask every query (a range query over the data so far, or an instant one where the
    panel asks for that) until all have data or the deadline passes; what still has none."""
    queries = dashboard_queries()
    while True:
        assert run.poll() is None, log_tail(run_log)
        now = time.time()
        variables: dict[str, list[str]] = {}
        for name, label, selector in dashboard_variables():
            match = substitute(selector, variables, now - started)
            variables[name] = sorted(await prom.api(f"label/{label}/values", **{
                "match[]": match, "start": started, "end": now}))
        missing = []
        if all(variables.values()):
            for where, expr, instant in queries:
                promql = substitute(expr, variables, now - started)
                if instant:
                    data = await prom.api("query", query=promql, time=now)
                else:
                    data = await prom.api("query_range", query=promql, start=started, end=now,
                                          step=INTERVAL_S)
                if not has_value(data["result"]):
                    missing.append((where, promql))
        else:
            missing = [("variables", json.dumps(variables))]
        if not missing or time.monotonic() > deadline:
            return missing, variables
        await asyncio.sleep(1.0)


async def _check_targets_and_labels(prom: Prometheus, run_dir: Path, started: float) -> None:
    """Every live function instance is a target Prometheus scrapes, labelled like a function
    pod; no scraped rlhfless series carries a label beyond the bounded set."""
    stages = {"actor", "reward", "learner"}

    async def all_up() -> bool:
        # Actors live for a rollout only (scaled to zero after it, prewarmed for the next), so
        # the listing is read afresh each time: every listed learner and reward instance must
        # be scraped and up, and each stage must have had a listed instance scraped and up.
        listed = json.loads((run_dir / TARGETS_FILE).read_text())
        targets = (await prom.api("targets", state="active"))["activeTargets"]
        seen = {t["scrapeUrl"].split("/")[2]: t for t in targets
                if t["scrapePool"] == "rlhfless-functions"}
        for group in listed:
            address, labels = group["targets"][0], group["labels"]
            target = seen.get(address)
            ok = (target is not None and target["health"] == "up"
                  and target["labels"]["instance"] == labels["instance"]
                  and target["labels"]["job"] == LOCAL_JOB)
            if ok:
                scraped_up.add(labels["stage"])
            elif labels["stage"] != "actor":
                return False
        return scraped_up >= stages

    scraped_up: set[str] = set()
    await wait_for("every listed instance scraped", all_up, time.monotonic() + 180, 0.2)
    series = await prom.api("series", **{"match[]": '{__name__=~"rlhfless_.+"}',
                                         "start": started, "end": time.time()})
    assert series
    for labels in series:
        assert set(labels) <= SERIES_LABELS, labels
