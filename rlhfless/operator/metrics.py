"""The operator's Prometheus metrics: every job's series (`rlhfless.jobmetrics`,
shared with `rlhfless run --metrics-port`) plus how many RLHFJobs are in each phase.

`METRIC_NAMES` is the one list of what the operator exports (as PromQL sees it; a histogram
by its base name), which the Grafana dashboard is checked against.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Gauge

from rlhfless.api.crd import PHASES
from rlhfless.jobmetrics import JOB_METRIC_NAMES, JobMetrics

METRIC_NAMES: tuple[str, ...] = ("rlhfless_jobs", *JOB_METRIC_NAMES)


class OperatorMetrics(JobMetrics):
    """All operator metrics on one registry (a fresh one per instance keeps tests apart)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        super().__init__(registry)
        self.jobs = Gauge("rlhfless_jobs", "RLHFJobs by phase.", ["phase"],
                          registry=self.registry)
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

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

    def forget(self, namespace: str, name: str) -> None:
        self.set_phase(namespace, name, None)
        super().forget(namespace, name)


METRICS = OperatorMetrics()
"""The process-wide instance the operator updates and serves."""
