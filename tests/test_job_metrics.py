"""Per-job Prometheus series (shared by the operator and `rlhfless run --metrics-port`) and
the stage functions' series: what they count, and that their labels stay bounded however
long a job runs (no step numbers, request ids or uids as label values)."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Iterable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from rlhfless.driver.records import StepRecord
from rlhfless.functions.app import create_app
from rlhfless.functions.metrics import OUTCOMES
from rlhfless.functions.serve import build_handler
from rlhfless.jobmetrics import (
    JOB_METRIC_NAMES,
    JobMetrics,
    JobReporter,
    MetricsPortError,
)
from rlhfless.model.tokenizer import load_tokenizer
from rlhfless.operator.metrics import OperatorMetrics
from rlhfless.runtime.base import InstanceUsage

# Every label any rlhfless series may carry, and what bounds its values.
ALLOWED_LABELS = {"namespace", "job", "stage", "outcome", "phase", "le", "use"}  # use: 4 values
HIGH_CARDINALITY = [
    re.compile(r"^\d+$"),  # a step number, a version, a pid
    re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),  # a uid
    re.compile(r"[0-9a-f]{12,}"),  # a digest, a request id
    re.compile(r"-s\d+"),  # the driver's request ids: <job>-s<step>-...
]


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """(sample name, sorted labels) of every sample in an exposition."""
    return {(s.name, tuple(sorted(s.labels.items())))
            for family in text_string_to_metric_families(text) for s in family.samples}


def assert_bounded(found: Iterable[tuple[str, tuple[tuple[str, str], ...]]]) -> None:
    for name, labels in found:
        for label, value in labels:
            assert label in ALLOWED_LABELS, f"{name}: unexpected label {label}={value!r}"
            if label == "le":
                continue  # histogram bucket bounds: fixed at definition
            for pattern in HIGH_CARDINALITY:
                assert not pattern.search(value), f"{name}: {label}={value!r} is unbounded"


def record(step: int, **metrics: float) -> StepRecord:
    return StepRecord(step, dict(metrics), reward_mean=step / 100, gpu_seconds_total=0.0,
                      weights_version=step, checkpoint="checkpoint.json")


def job_step(metrics: JobMetrics, step: int) -> None:
    metrics.observe_step("ml", "demo", record(step, **{
        "timing_s/step": 1.0 + step % 7, "cost/gpu_seconds/actor": 2.0,
        "cost/cold_start_gpu_seconds/actor": 0.5 if step == 1 else 0.0,
        "cost/gpu_seconds/trainer": 1.0, "cost/cold_start_gpu_seconds/trainer": 0.0,
        "idle_ratio/actor": 0.3, "sched/actors": float(step % 3 + 1),
        "sched/pred_mae_tokens": float(step), "reward/mean": step / 100,
        "cost/dollars/actor": 0.01, "cost/split/busy/actor": 1.5,
        "cost/split/cold_start/actor": 0.5, "cost/serverful/gpu_seconds": 4.0,
        "cost/serverful/dollars": 0.02, "cost/tail/share": 0.25,
        f"train/step_{step}": 1.0}))
    metrics.observe_budget("ml", "demo", step / 100)
    # A fresh instance name every step, as scale-to-zero produces.
    metrics.observe_usage("ml", "demo", [InstanceUsage("actor", f"actor-{step}", 1, 0.0, None,
                                                       0.0)])


def test_driver_start_creates_the_counters_at_zero() -> None:
    """A counter first scraped at its first step's value hides that step from rate():
    every per-job and per-stage counter exists at 0 from the driver's start."""
    m = JobMetrics()
    m.driver_started("ml", "demo", ("actor", "trainer"), now=1000.0)
    text = m.exposition().decode()
    for stage in ("actor", "trainer"):
        labels = f'{{job="demo",namespace="ml",stage="{stage}"}}'
        assert f"rlhfless_gpu_seconds_total{labels} 0.0" in text
        assert f"rlhfless_cold_start_gpu_seconds_total{labels} 0.0" in text
    assert 'rlhfless_job_steps_total{job="demo",namespace="ml"} 0.0' in text
    assert 'rlhfless_step_seconds_count{job="demo",namespace="ml"} 0.0' in text
    assert 'rlhfless_driver_running{job="demo",namespace="ml"} 1.0' in text
    assert 'rlhfless_driver_start_time_seconds{job="demo",namespace="ml"} 1000.0' in text
    job_step(m, 1)
    text = m.exposition().decode()
    assert 'rlhfless_cold_start_gpu_seconds_total{job="demo",namespace="ml",stage="actor"} 0.5' \
        in text
    assert 'rlhfless_job_steps_total{job="demo",namespace="ml"} 1.0' in text
    m.driver_stopped("ml", "demo")
    assert 'rlhfless_driver_running{job="demo",namespace="ml"} 0.0' in m.exposition().decode()


def test_a_reporter_feeds_one_job() -> None:
    m = JobMetrics()
    reporter = JobReporter(m, "ml", "demo", ("actor",))
    reporter.driver_started()
    reporter.step(record(1, **{"timing_s/step": 2.0, "cost/gpu_seconds/actor": 3.0}),
                  [InstanceUsage("actor", "actor-0", 1, 0.0, None, 0.0),
                   InstanceUsage("actor", "actor-1", 1, 0.0, 5.0, 0.0)])
    assert m.steps.labels("ml", "demo")._value.get() == 1
    assert m.gpu_seconds.labels("ml", "demo", "actor")._value.get() == 3.0
    assert m.actors_alive.labels("ml", "demo")._value.get() == 1
    assert m.last_step.labels("ml", "demo")._value.get() > 0


def test_job_series_stay_bounded_however_long_the_job_runs() -> None:
    m = OperatorMetrics()
    m.set_phase("ml", "demo", "Running")
    m.driver_started("ml", "demo", ("actor", "trainer"))
    for step in range(1, 6):
        job_step(m, step)
    after_5 = series(m.exposition().decode())
    for step in range(6, 51):
        job_step(m, step)
    m.driver_stopped("ml", "demo")
    m.driver_started("ml", "demo", ("actor", "trainer"))  # a restart adds no series either
    after_50 = series(m.exposition().decode())
    assert after_50 == after_5
    assert_bounded(after_50)
    names = {name for name, _ in after_50}
    assert {n for n in JOB_METRIC_NAMES if not any(s.startswith(n) for s in names)} == set()


def test_function_series_stay_bounded_however_many_requests(tiny_store) -> None:
    job, store = tiny_store
    tok = load_tokenizer(store.base_dir / "tokenizer")
    client = TestClient(create_app(build_handler("actor", job, store), token="t"),
                        headers={"Authorization": "Bearer t"})
    # Before any request every outcome is already exported at 0 (rates see the first one).
    before = series(client.get("/metrics").text)
    outcomes = {dict(labels)["outcome"] for name, labels in before
                if name == "rlhfless_function_requests_total"}
    assert outcomes == set(OUTCOMES)
    prompt = tok.encode(tok.render_prompt("hi"))

    def invoke(request_id: str, **extra: object) -> int:
        body = {"request_id": request_id, "weights_version": 0, "max_new_tokens": 3,
                "temperature": 1.0, "seed": 1,
                "prompts": [{"key": "p0", "prompt_ids": prompt, "sample_indices": [0]}]}
        return client.post("/invoke", json={**body, **extra}).status_code

    assert invoke(f"demo-s0-{uuid.uuid4().hex}") == 200
    first = series(client.get("/metrics").text)  # + the weights version, once loaded
    for i in range(1, 12):
        assert invoke(f"demo-s{i}-{uuid.uuid4().hex}") == 200
    assert invoke("demo-s0-again") == 200 and invoke("demo-s0-again") == 200  # cached
    assert invoke("demo-s0-again", seed=2) == 409  # refused
    assert invoke(f"bad-{uuid.uuid4()}", weights_version=99) >= 400
    assert client.post("/invoke", content=b"not json").status_code == 400  # invalid
    after = series(client.get("/metrics").text)
    assert after == first
    assert first - before == {("rlhfless_function_weights_version", (("stage", "actor"),))}
    assert_bounded(after)


def test_a_metrics_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsPortError, match=f"127.0.0.1:{port}"):
            JobMetrics().serve(port, addr="127.0.0.1")
    server = JobMetrics().serve(0, addr="127.0.0.1")  # 0: any free port
    try:
        assert server.port > 0
    finally:
        server.close()
