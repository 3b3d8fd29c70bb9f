"""Let a stock Prometheus find a local run's metrics.

Each function instance of the embedded runtime serves `/metrics` on a random loopback port.
`prometheus_targets.json` in the run directory lists the live ones in Prometheus's
file-based service-discovery format (`file_sd_configs`), with the labels a PodMonitor gives
a function pod on a cluster: `namespace`, `job` (the RLHFJob's name), `stage` and
`instance` (the instance's name, as in `logs/<instance>.log`). It is rewritten atomically,
so Prometheus never reads half a file. `prometheus_config` is a whole prometheus.yml for a
run: the job's metrics (`rlhfless run --metrics-port`) plus that file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfless.store.atomic import write_json_atomic

TARGETS_FILE = "prometheus_targets.json"
PROMETHEUS_CONFIG_FILE = "prometheus.yml"
# The chart's alert and recording rules, when this package runs from a source checkout.
CHART_RULES = Path(__file__).resolve().parents[2] / "charts/rlhfless/files/prometheus-rules.yaml"


@dataclass(frozen=True)
class Target:
    """One live function instance."""

    address: str  # host:port of its /metrics
    stage: str
    instance: str


def target_groups(namespace: str, job: str, targets: Iterable[Target]) -> list[dict[str, Any]]:
    """The file_sd document: one group per instance (its labels differ)."""
    return [{"targets": [t.address],
             "labels": {"namespace": namespace, "job": job, "stage": t.stage,
                        "instance": t.instance}}
            for t in sorted(targets, key=lambda t: (t.stage, t.instance))]


class TargetsFile:
    """`prometheus_targets.json`, rewritten only when the set of live instances changes."""

    def __init__(self, path: Path, namespace: str, job: str):
        self.path = Path(path)
        self.namespace, self.job = namespace, job
        self._written: list[dict[str, Any]] | None = None

    def publish(self, targets: Iterable[Target]) -> None:
        groups = target_groups(self.namespace, self.job, targets)
        if groups != self._written:
            write_json_atomic(self.path, groups)
            self._written = groups


def prometheus_config(targets_file: Path, job_metrics: str | None = None,
                      rule_files: Sequence[Path] = (), interval_s: float = 5.0) -> dict[str, Any]:
    """prometheus.yml scraping a local run: `job_metrics` (host:port of the job's /metrics)
    and every function instance in `targets_file`.

    `honor_labels` keeps the series' own `job` (the RLHFJob's name, what the dashboard
    filters on) instead of renaming it `exported_job`."""
    interval = f"{interval_s:g}s"
    scrapes: list[dict[str, Any]] = []
    if job_metrics is not None:
        scrapes.append({"job_name": "rlhfless-job", "honor_labels": True,
                        "static_configs": [{"targets": [job_metrics]}]})
    scrapes.append({"job_name": "rlhfless-functions", "honor_labels": True,
                    "file_sd_configs": [{"files": [str(targets_file)]}]})
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": scrapes,
    }
    if rule_files:
        config["rule_files"] = [str(p) for p in rule_files]
    return config
