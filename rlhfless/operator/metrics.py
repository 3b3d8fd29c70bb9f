"""The operator's Prometheus metrics (`rlhfless_` prefix), on their own registry and port.

Names follow Prometheus conventions: `_seconds`, `_total`, ratios in 0–1; labels are the
job's namespace and name (and the stage), never step numbers or uids. `METRIC_NAMES` is the
one list of what is exported (as PromQL sees it; a histogram by its base name), which the
Grafana dashboard is checked against.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from rlhfless.api.crd import PHASES
from rlhfless.api.progress import (
    KEY_ACTORS_CHOSEN,
    KEY_GPU_SECONDS_PREFIX,
    KEY_IDLE_PREFIX,
    KEY_LENGTH_MAE,
    KEY_STEP_SECONDS,
    StepSummary,
)

METRIC_NAMES: tuple[str, ...] = (
    "rlhfless_jobs",
    "rlhfless_job_steps_total",
    "rlhfless_step_seconds",
    "rlhfless_gpu_seconds_total",
    "rlhfless_reward",
    "rlhfless_actors_alive",
    "rlhfless_idle_ratio",
    "rlhfless_length_prediction_mae_tokens",
    "rlhfless_scheduling_actors_chosen",
)

_JOB = ("namespace", "job")
# Steps last from seconds (tiny CPU models) to tens of minutes (large models on GPUs).
_STEP_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class OperatorMetrics:
    """All operator metrics on one registry (a fresh one per instance keeps tests apart)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("rlhfless_jobs", "RLHFJobs by phase.", ["phase"], registry=r)
        self.steps = Counter("rlhfless_job_steps", "RL steps completed.", _JOB, registry=r)
        self.step_seconds = Histogram("rlhfless_step_seconds", "Wall time of one RL step.",
                                      _JOB, buckets=_STEP_BUCKETS, registry=r)
        self.gpu_seconds = Counter("rlhfless_gpu_seconds", "GPU-seconds billed (GPUs x "
                                   "seconds alive, cold start and keep-alive included).",
                                   (*_JOB, "stage"), registry=r)
        self.reward = Gauge("rlhfless_reward", "Mean reward of the last step.", _JOB,
                            registry=r)
        self.actors_alive = Gauge("rlhfless_actors_alive", "Actor function instances alive.",
                                  _JOB, registry=r)
        self.idle_ratio = Gauge("rlhfless_idle_ratio", "Fraction of a stage's instance time "
                                "not spent serving, last step (0-1).", (*_JOB, "stage"),
                                registry=r)
        self.length_mae = Gauge("rlhfless_length_prediction_mae_tokens", "Mean absolute "
                                "error of the response-length prediction, last step.", _JOB,
                                registry=r)
        self.actors_chosen = Gauge("rlhfless_scheduling_actors_chosen", "Actor functions "
                                   "the scheduler chose for the last step.", _JOB, registry=r)
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    # -- updates -------------------------------------------------------------------------
    def set_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Track each job's phase; `None` forgets the job (deleted)."""
        with self._lock:
            if phase is None:
                self._phases.pop((namespace, name), None)
            else:
                self._phases[(namespace, name)] = phase
            counts = dict.fromkeys(PHASES, 0)
            for value in self._phases.values():
                counts[value] = counts.get(value, 0) + 1
            for value, count in counts.items():
                self.jobs.labels(value).set(count)

    def observe_step(self, namespace: str, name: str, record: StepSummary) -> None:
        """One step as the job's driver reported it (api.progress)."""
        m: Mapping[str, float] = record.metrics
        job = (namespace, name)
        self.steps.labels(*job).inc()
        if KEY_STEP_SECONDS in m:
            self.step_seconds.labels(*job).observe(float(m[KEY_STEP_SECONDS]))
        for key, value in m.items():
            if key.startswith(KEY_GPU_SECONDS_PREFIX) and value > 0:
                self.gpu_seconds.labels(*job, key[len(KEY_GPU_SECONDS_PREFIX):]).inc(value)
            elif key.startswith(KEY_IDLE_PREFIX):
                self.idle_ratio.labels(*job, key[len(KEY_IDLE_PREFIX):]).set(float(value))
        self.reward.labels(*job).set(float(record.reward))
        self.actors_alive.labels(*job).set(record.actors_alive)
        if KEY_ACTORS_CHOSEN in m:
            self.actors_chosen.labels(*job).set(float(m[KEY_ACTORS_CHOSEN]))
        if KEY_LENGTH_MAE in m:
            self.length_mae.labels(*job).set(float(m[KEY_LENGTH_MAE]))

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted job's series so dashboards do not show it forever."""
        self.set_phase(namespace, name, None)
        for metric in (self.steps, self.step_seconds, self.reward, self.actors_alive,
                       self.length_mae, self.actors_chosen, self.gpu_seconds, self.idle_ratio):
            for labels in list(_label_sets(metric)):
                if labels[:2] == (namespace, name):
                    metric.remove(*labels)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics on `port` from a background thread (never blocks the loop)."""
        start_http_server(port, addr=addr, registry=self.registry)


def _label_sets(metric: Counter | Gauge | Histogram) -> Iterable[tuple[str, ...]]:
    # prometheus_client keeps children by label values; this is its documented-by-use store.
    return tuple(metric._metrics.keys())


METRICS = OperatorMetrics()
"""The process-wide instance the operator updates and serves."""
