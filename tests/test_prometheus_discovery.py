"""How a stock Prometheus finds a local run: the discovery file the embedded runtime keeps,
the prometheus.yml `rlhfless run --metrics-port` writes, and a metrics port in use."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from typer.testing import CliRunner

from rlhfless.cli import app
from rlhfless.runtime.discovery import (
    CHART_RULES,
    PROMETHEUS_CONFIG_FILE,
    TARGETS_FILE,
    Target,
    TargetsFile,
    prometheus_config,
    target_groups,
)
from rlhfless.runtime.local import LocalRuntime
from tests.conftest import tiny_job

runner = CliRunner()


def test_target_groups_label_each_instance_like_a_function_pod() -> None:
    groups = target_groups("ml", "demo", [Target("127.0.0.1:4001", "reward", "reward-0"),
                                          Target("127.0.0.1:4000", "actor", "actor-3")])
    assert groups == [
        {"targets": ["127.0.0.1:4000"],
         "labels": {"namespace": "ml", "job": "demo", "stage": "actor", "instance": "actor-3"}},
        {"targets": ["127.0.0.1:4001"],
         "labels": {"namespace": "ml", "job": "demo", "stage": "reward", "instance": "reward-0"}},
    ]


def test_targets_file_is_rewritten_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / TARGETS_FILE
    targets = TargetsFile(path, "ml", "demo")
    targets.publish([Target("127.0.0.1:4000", "actor", "actor-0")])
    first = path.stat().st_ino
    targets.publish([Target("127.0.0.1:4000", "actor", "actor-0")])
    assert path.stat().st_ino == first  # unchanged: not rewritten
    targets.publish([])
    assert json.loads(path.read_text()) == []
    assert path.stat().st_ino != first  # replaced by rename, never written in place
    assert [p.name for p in tmp_path.iterdir()] == [TARGETS_FILE]  # no temporary left


def test_prometheus_config_keeps_the_jobs_own_labels(tmp_path: Path) -> None:
    config = prometheus_config(tmp_path / TARGETS_FILE, "127.0.0.1:9400", [CHART_RULES], 2)
    assert config["global"] == {"scrape_interval": "2s", "evaluation_interval": "2s"}
    assert config["rule_files"] == [str(CHART_RULES)]
    job, functions = config["scrape_configs"]
    # honor_labels: the series' job label (the RLHFJob) must not become exported_job.
    assert job["honor_labels"] and functions["honor_labels"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9400"]}]
    assert functions["file_sd_configs"] == [{"files": [str(tmp_path / TARGETS_FILE)]}]
    assert "rule_files" not in prometheus_config(tmp_path / TARGETS_FILE)


def test_local_runtime_lists_live_instances_for_prometheus(tmp_path: Path) -> None:
    """Real function processes: each ready instance appears with its labels and serves
    /metrics at the listed address; one that dies or stops disappears."""
    job = tiny_job("disc", steps=1)
    path = tmp_path / TARGETS_FILE

    def listed() -> dict[str, dict[str, str]]:
        groups = json.loads(path.read_text())
        return {g["labels"]["instance"]: {**g["labels"], "address": g["targets"][0]}
                for g in groups}

    async def wait_until(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"discovery file still {listed()}"
            await asyncio.sleep(0.1)

    async def go() -> None:
        async with LocalRuntime(job, tmp_path / "store", tmp_path, keep_alive_s=600,
                                threads_per_instance=1) as runtime:
            assert listed() == {}  # the file exists before any instance does
            await runtime.scale("reward", 1)
            (first,) = runtime.instances("reward")
            assert listed() == {first.name: {"namespace": "default", "job": "disc",
                                             "stage": "reward", "instance": first.name,
                                             "address": f"127.0.0.1:{first.port}"}}
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"http://{listed()[first.name]['address']}/metrics")).text
            assert 'rlhfless_function_requests_total{outcome="ok",stage="reward"} 0.0' in text
            os.killpg(first.process.pid, signal.SIGKILL)  # dies on its own
            await wait_until(lambda: listed() == {})
            await runtime.scale("reward", 1)
            (second,) = [i for i in runtime.instances("reward") if i.alive]
            assert set(listed()) == {second.name} != {first.name}
        assert listed() == {}  # closed: nothing left to scrape

    asyncio.run(go())


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _job_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "rlhfless.io/v1alpha1", "kind": "RLHFJob", "metadata": {"name": "port"},
        "spec": {"model": {"source": "tiny"}, "steps": 1}}))
    return path


def test_run_with_a_metrics_port_in_use_changes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.json").write_text("{}")  # an old run --overwrite would delete
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["run", str(_job_file(tmp_path)), "--run-dir",
                                     str(run_dir), "--overwrite", "--metrics-port", str(port)])
    out = " ".join(result.output.split())
    assert result.exit_code == 2, out
    assert f"--metrics-port {port}:" in out and "Address already in use" in out
    assert "Nothing was started" in out and "Traceback" not in out
    assert [p.name for p in run_dir.iterdir()] == ["checkpoint.json"]  # not overwritten
    bad = runner.invoke(app, ["run", str(_job_file(tmp_path)), "--metrics-port", "70000"])
    assert bad.exit_code == 2 and "--metrics-port" in bad.output


def test_operator_with_a_metrics_port_in_use_exits_2() -> None:
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "rlhfless.cli", "operator",
                               "--metrics-port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = " ".join(proc.stderr.split())
    assert f"--metrics-port {port}:" in err and "Address already in use" in err
    assert "Traceback" not in err


def test_readme_three_commands_match_the_files_they_name() -> None:
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    block = readme.split("### Watch a local run with Prometheus and Grafana", 1)[1]
    block = block.split("```bash", 1)[1].split("```", 1)[0]
    job = yaml.safe_load((repo / "examples" / "tiny-grpo.yaml").read_text())
    assert "rlhfless run examples/tiny-grpo.yaml --metrics-port 9400" in block
    config = f"runs/{job['metadata']['name']}/{PROMETHEUS_CONFIG_FILE}"
    assert f"prometheus --config.file={config}" in block
    provisioning = repo / "examples" / "grafana"
    assert '"$PWD/examples/grafana:/etc/grafana/provisioning:ro"' in block
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://localhost:9090"
    assert source["jsonData"]["timeInterval"] == "5s" == prometheus_config(Path("x"))[
        "global"]["scrape_interval"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "rlhfless.yaml").read_text())[
        "providers"]
    mounted = provider["options"]["path"]
    assert f'"$PWD/charts/rlhfless/files:{mounted}:ro"' in block
    assert (CHART_RULES.parent / "dashboard.json").exists()
