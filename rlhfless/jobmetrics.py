"""Per-job Prometheus metrics: one definition for every process that reports a job.

The operator (all its jobs on one registry, from the progress each job's driver pod
publishes), `rlhfless run --metrics-port` (one job) and a driver pod started with
`--metrics-port` export the same series, fed from each step's record (a `StepRecord`, or
the `api.progress.StepSummary` a driver pod published) and the runtime's meter. The module
imports nothing of the driver, the runtime or the ML stack: the operator loads it.

Names follow Prometheus conventions (`rlhfless_` prefix, `_seconds`, `_total`, ratios 0-1).
Labels are the job's `namespace` and `job` name and, where a value is per stage, `stage`:
never step numbers, request ids or uids, so the number of series stays bounded by jobs x
stages however long a job runs.

Scrape these with `honor_labels: true` (the chart's ServiceMonitor does): Prometheus would
otherwise rename the job's `job` label to `exported_job` and the dashboard would not find it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from rlhfless.cost.row import (
    KEY_DOLLARS,
    KEY_SERVERFUL_DOLLARS,
    KEY_SERVERFUL_GPU_SECONDS,
    KEY_SPLIT,
    KEY_TAIL_SHARE,
)
from rlhfless.cost.split import USES

JOB_METRIC_NAMES: tuple[str, ...] = (
    "rlhfless_job_steps_total",
    "rlhfless_step_seconds",
    "rlhfless_gpu_seconds_total",
    "rlhfless_cold_start_gpu_seconds_total",
    "rlhfless_reward",
    "rlhfless_actors_alive",
    "rlhfless_idle_ratio",
    "rlhfless_length_prediction_mae_tokens",
    "rlhfless_scheduling_actors_chosen",
    "rlhfless_job_last_step_timestamp_seconds",
    "rlhfless_driver_running",
    "rlhfless_driver_start_time_seconds",
    "rlhfless_cost_dollars_total",
    "rlhfless_gpu_seconds_by_use_total",
    "rlhfless_serverful_gpu_seconds_total",
    "rlhfless_serverful_dollars_total",
    "rlhfless_rollout_tail_ratio",
    "rlhfless_budget_used_ratio",
)
"""What is exported per job, as PromQL sees it (a histogram by its base name)."""

# Step record keys read here (rlhfless/driver/metrics.py and planner.py write them).
KEY_STEP_SECONDS = "timing_s/step"
KEY_GPU_SECONDS_PREFIX = "cost/gpu_seconds/"
KEY_COLD_GPU_SECONDS_PREFIX = "cost/cold_start_gpu_seconds/"
KEY_IDLE_PREFIX = "idle_ratio/"
KEY_ACTORS_CHOSEN = "sched/actors"
KEY_LENGTH_MAE = "sched/pred_mae_tokens"

_READ_KEYS = (KEY_STEP_SECONDS, KEY_ACTORS_CHOSEN, KEY_LENGTH_MAE, KEY_SERVERFUL_GPU_SECONDS,
              KEY_SERVERFUL_DOLLARS, KEY_TAIL_SHARE)
_READ_PREFIXES = (KEY_GPU_SECONDS_PREFIX, KEY_COLD_GPU_SECONDS_PREFIX, KEY_IDLE_PREFIX,
                  KEY_DOLLARS + "/", KEY_SPLIT + "/")


def exported_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The part of a step's metrics these series are made of (what a driver pod publishes
    for the operator to export)."""
    return {k: float(v) for k, v in sorted(metrics.items())
            if k in _READ_KEYS or k.startswith(_READ_PREFIXES)}


class UsageLike(Protocol):
    """An instance's life as a runtime meters it (`runtime.base.InstanceUsage`)."""

    @property
    def stage(self) -> str: ...

    @property
    def ended_at(self) -> float | None: ...


class StepLike(Protocol):
    """A step as a StepRecord (this process drove it) or the summary a driver pod published
    (api.progress.StepSummary) carries it."""

    @property
    def metrics(self) -> Mapping[str, float]: ...

    @property
    def reward_mean(self) -> float: ...


JOB_LABELS = ("namespace", "job")
# Steps last from seconds (tiny CPU models) to tens of minutes (large models on GPUs).
STEP_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class MetricsPortError(OSError):
    """The metrics port cannot be listened on (in use, or not ours to take)."""


@dataclass
class MetricsServer:
    """A running /metrics endpoint (a daemon thread); `close` frees the port."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class JobMetrics:
    """Per-job series on one registry (a fresh registry per instance keeps tests apart)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, job, per_stage = self.registry, JOB_LABELS, (*JOB_LABELS, "stage")
        self.steps = Counter("rlhfless_job_steps", "RL steps completed.", job, registry=r)
        self.step_seconds = Histogram("rlhfless_step_seconds", "Wall time of one RL step.",
                                      job, buckets=STEP_BUCKETS, registry=r)
        self.gpu_seconds = Counter("rlhfless_gpu_seconds", "GPU-seconds billed (GPUs x "
                                   "seconds alive, cold start and keep-alive included).",
                                   per_stage, registry=r)
        self.cold_gpu_seconds = Counter("rlhfless_cold_start_gpu_seconds", "The part of "
                                        "rlhfless_gpu_seconds_total spent starting instances "
                                        "(process start to ready).", per_stage, registry=r)
        self.reward = Gauge("rlhfless_reward", "Mean reward of the last step.", job,
                            registry=r)
        self.actors_alive = Gauge("rlhfless_actors_alive", "Actor function instances alive.",
                                  job, registry=r)
        self.idle_ratio = Gauge("rlhfless_idle_ratio", "Fraction of a stage's instance time "
                                "not spent serving, last step (0-1).", per_stage, registry=r)
        self.length_mae = Gauge("rlhfless_length_prediction_mae_tokens", "Mean absolute "
                                "error of the response-length prediction, last step.", job,
                                registry=r)
        self.actors_chosen = Gauge("rlhfless_scheduling_actors_chosen", "Actor functions "
                                   "the scheduler chose for the last step.", job, registry=r)
        self.last_step = Gauge("rlhfless_job_last_step_timestamp_seconds", "Unix time the "
                               "last step completed.", job, registry=r)
        self.driver_running = Gauge("rlhfless_driver_running", "1 while a driver runs the "
                                    "job's steps, else 0 (done, suspended, failed).", job,
                                    registry=r)
        self.driver_started_at = Gauge("rlhfless_driver_start_time_seconds", "Unix time the "
                                       "job's driver last (re)started: changes() counts "
                                       "restarts, whichever process restarted.", job,
                                       registry=r)
        self.dollars = Counter("rlhfless_cost_dollars", "Dollars billed (GPU-seconds x the "
                               "price of the stage's GPU type); absent without a price.",
                               per_stage, registry=r)
        self.gpu_seconds_by_use = Counter(
            "rlhfless_gpu_seconds_by_use", "GPU-seconds by what they were spent on: busy, "
            "cold_start, prewarm_wait, keep_alive_idle (they add up to "
            "rlhfless_gpu_seconds_total).", (*per_stage, "use"), registry=r)
        self.serverful_gpu_seconds = Counter(
            "rlhfless_serverful_gpu_seconds", "GPU-seconds a serverful layout would have held "
            "on the same timings (every stage's GPUs for the whole step).", job, registry=r)
        self.serverful_dollars = Counter("rlhfless_serverful_dollars", "The serverful layout's "
                                         "GPU-seconds in dollars.", job, registry=r)
        self.tail_ratio = Gauge("rlhfless_rollout_tail_ratio", "Share of the last rollout "
                                "spent with fewer than half of its samples running (0-1).",
                                job, registry=r)
        self.budget_used = Gauge("rlhfless_budget_used_ratio", "Largest fraction of a "
                                 "spec.budget limit spent (0-1; above 1 is over).", job,
                                 registry=r)

    # -- updates -------------------------------------------------------------------------
    def driver_started(self, namespace: str, name: str, stages: Iterable[str] = (),
                       now: float | None = None) -> None:
        """A driver began running the job's steps (first start, resume or restart).

        The job's counters are created at 0 here, for each of its `stages` too: Prometheus
        sees no increase in a series whose first sample is already the first step's value,
        so the first step (cold starts and all) would be missing from every rate."""
        job = (namespace, name)
        for metric in (self.steps, self.step_seconds):
            metric.labels(*job)
        for stage in stages:
            self.gpu_seconds.labels(*job, stage)
            self.cold_gpu_seconds.labels(*job, stage)
        self.driver_started_at.labels(*job).set(time.time() if now is None else now)
        self.driver_running.labels(*job).set(1)

    def driver_stopped(self, namespace: str, name: str) -> None:
        self.driver_running.labels(namespace, name).set(0)

    def observe_step(self, namespace: str, name: str, record: StepLike,
                     now: float | None = None) -> None:
        m: Mapping[str, float] = record.metrics
        job = (namespace, name)
        self.steps.labels(*job).inc()
        self.last_step.labels(*job).set(time.time() if now is None else now)
        if KEY_STEP_SECONDS in m:
            self.step_seconds.labels(*job).observe(float(m[KEY_STEP_SECONDS]))
        for key, value in m.items():
            if key.startswith(KEY_GPU_SECONDS_PREFIX):
                # inc(0) still creates the series: a stage is visible from its first step.
                self.gpu_seconds.labels(*job, key.removeprefix(KEY_GPU_SECONDS_PREFIX)).inc(
                    max(0.0, float(value)))
            elif key.startswith(KEY_COLD_GPU_SECONDS_PREFIX):
                stage = key.removeprefix(KEY_COLD_GPU_SECONDS_PREFIX)
                self.cold_gpu_seconds.labels(*job, stage).inc(max(0.0, float(value)))
            elif key.startswith(KEY_IDLE_PREFIX):
                self.idle_ratio.labels(*job, key.removeprefix(KEY_IDLE_PREFIX)).set(float(value))
            elif key.startswith(KEY_DOLLARS + "/"):
                self.dollars.labels(*job, key.removeprefix(KEY_DOLLARS + "/")).inc(
                    max(0.0, float(value)))
            elif key.startswith(KEY_SPLIT + "/") and key.count("/") == 3:
                use, stage = key.split("/")[2:]
                if use in USES:
                    self.gpu_seconds_by_use.labels(*job, stage, use).inc(max(0.0, float(value)))
        for key, counter in ((KEY_SERVERFUL_GPU_SECONDS, self.serverful_gpu_seconds),
                             (KEY_SERVERFUL_DOLLARS, self.serverful_dollars)):
            if key in m:
                counter.labels(*job).inc(max(0.0, float(m[key])))
        if KEY_TAIL_SHARE in m:
            self.tail_ratio.labels(*job).set(float(m[KEY_TAIL_SHARE]))
        self.reward.labels(*job).set(float(record.reward_mean))
        if KEY_ACTORS_CHOSEN in m:
            self.actors_chosen.labels(*job).set(float(m[KEY_ACTORS_CHOSEN]))
        if KEY_LENGTH_MAE in m:
            self.length_mae.labels(*job).set(float(m[KEY_LENGTH_MAE]))

    def observe_budget(self, namespace: str, name: str, used: float | None) -> None:
        """The budget check after a step (`None`: the job sets no budget)."""
        if used is not None:
            self.budget_used.labels(namespace, name).set(used)

    def observe_usage(self, namespace: str, name: str, usages: Iterable[UsageLike]) -> None:
        self.observe_actors(namespace, name, actors_alive(usages))

    def observe_actors(self, namespace: str, name: str, alive: int) -> None:
        self.actors_alive.labels(namespace, name).set(alive)

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted job's series so dashboards do not show it forever."""
        for metric in self._per_job():
            for labels in list(_label_sets(metric)):
                if labels[:2] == (namespace, name):
                    metric.remove(*labels)

    # -- serving -------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The registry in Prometheus text format (to serve from another HTTP server)."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "0.0.0.0") -> MetricsServer:
        """Expose /metrics on `port` (0: any free port) from a daemon thread (never blocks
        the event loop). A port in use raises MetricsPortError at once."""
        try:
            server, thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise MetricsPortError(exc.errno, f"cannot serve metrics on {addr}:{port}: "
                                   f"{exc.strerror or exc}") from None
        return MetricsServer(server, thread)

    def _per_job(self) -> tuple[Counter | Gauge | Histogram, ...]:
        return (self.steps, self.step_seconds, self.gpu_seconds, self.cold_gpu_seconds,
                self.reward, self.actors_alive, self.idle_ratio, self.length_mae,
                self.actors_chosen, self.last_step, self.driver_running,
                self.driver_started_at, self.dollars, self.gpu_seconds_by_use,
                self.serverful_gpu_seconds, self.serverful_dollars, self.tail_ratio,
                self.budget_used)


@dataclass
class JobReporter:
    """One job's handle on a JobMetrics: what a process driving a single job calls (the
    CLI; a job's own driver process). The operator calls JobMetrics for each of its jobs."""

    metrics: JobMetrics
    namespace: str
    name: str
    stages: tuple[str, ...] = ()

    def driver_started(self) -> None:
        self.metrics.driver_started(self.namespace, self.name, self.stages)

    def driver_stopped(self) -> None:
        self.metrics.driver_stopped(self.namespace, self.name)

    def step(self, record: StepLike, usages: Iterable[UsageLike],
             budget_used: float | None = None) -> None:
        self.metrics.observe_step(self.namespace, self.name, record)
        self.metrics.observe_usage(self.namespace, self.name, usages)
        self.metrics.observe_budget(self.namespace, self.name, budget_used)


def actors_alive(usages: Iterable[UsageLike]) -> int:
    return sum(1 for u in usages if u.stage == "actor" and u.ended_at is None)


def _label_sets(metric: Counter | Gauge | Histogram) -> Iterable[tuple[str, ...]]:
    # prometheus_client keeps children by label values; this is its documented-by-use store.
    return tuple(metric._metrics.keys())
