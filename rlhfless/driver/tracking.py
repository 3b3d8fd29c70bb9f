"""Where each step's metrics go besides metrics.jsonl: TensorBoard always, MLflow and W&B when
`spec.logging.backends` names them. Every sink gets the same keys as metrics.jsonl (numbers
only: the instance timeline stays in the jsonl).

    run_dir/tensorboard/   event files (`tensorboard --logdir run_dir/tensorboard`)
    run_dir/mlruns/        MLflow file store, unless logging.mlflowTrackingUri names another
    run_dir/wandb/         W&B run (offline by default: `wandb sync run_dir/wandb/offline-*`)
    run_dir/trackers.json  the MLflow / W&B run ids, so a resumed job continues the same run

A sink that fails while writing is dropped with a warning: losing a dashboard never stops
training (metrics.jsonl stays complete).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("rlhfless.driver.tracking")
IDS_FILE = "trackers.json"


class TrackingError(RuntimeError):
    """A tracker the job asks for that cannot be used here (package missing, bad URI)."""


class MetricSink(Protocol):
    def write(self, step: int, row: Mapping[str, Any]) -> None:
        """Record one step's metrics row (as written to metrics.jsonl)."""

    def close(self) -> None: ...


class LoggingSpecLike(Protocol):
    backends: list[str]
    project: str | None
    mlflow_tracking_uri: str | None
    wandb_mode: str


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, minus the step itself."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardSink:
    def __init__(self, logdir: Path, resume_step: int = 0):
        from tensorboardX import SummaryWriter

        # purge_step hides events a crashed run wrote past the checkpoint it resumes from.
        self.writer = SummaryWriter(str(logdir), purge_step=resume_step + 1 if resume_step
                                    else None, flush_secs=5)

    def write(self, step: int, row: Mapping[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowSink:
    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str,
                 run_dir: Path, ids: _RunIds):
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackingError("logging.backends names mlflow, but the mlflow package is not "
                                "installed (pip install 'rlhfless[mlflow]')") from None
        if tracking_uri is None:
            # MLflow 3 keeps the file store but refuses it unless asked: it is what works
            # offline, next to the run's other files.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            tracking_uri = (run_dir / "mlruns").resolve().as_uri()
        self._metric = Metric
        self.client = MlflowClient(tracking_uri=tracking_uri)
        run_id = ids.get("mlflow")
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found is not None
                             else self.client.create_experiment(experiment))
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            ids.set("mlflow", run_id)
        self.run_id = run_id

    def write(self, step: int, row: Mapping[str, Any]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(key, value, now, step) for key, value in scalars(row).items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbSink:
    def __init__(self, project: str, run_name: str, mode: str, run_dir: Path, ids: _RunIds):
        try:
            import wandb
        except ImportError:
            raise TrackingError("logging.backends names wandb, but the wandb package is not "
                                "installed (pip install 'rlhfless[wandb]')") from None
        run_id = ids.get("wandb") or uuid.uuid4().hex[:12]
        ids.set("wandb", run_id)
        # create_new: several jobs' drivers may share one process (the operator).
        self.run = wandb.init(project=project, name=run_name, id=run_id, dir=str(run_dir),
                              mode=mode, resume="allow", reinit="create_new")

    def write(self, step: int, row: Mapping[str, Any]) -> None:
        self.run.log(scalars(row), step=step, commit=True)

    def close(self) -> None:
        self.run.finish()


class _RunIds:
    """Tracker run ids kept in the run directory (a resumed job logs into the same runs)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.ids: dict[str, str] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            self.ids = {}

    def get(self, name: str) -> str | None:
        return self.ids.get(name)

    def set(self, name: str, value: str) -> None:
        self.ids[name] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.ids, indent=1, sort_keys=True))
        tmp.replace(self.path)


def open_sinks(logging_spec: LoggingSpecLike | None, job_name: str, run_dir: Path,
               resume_step: int = 0) -> list[MetricSink]:
    """TensorBoard, plus the trackers `logging_spec` names; TrackingError if one is missing."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sinks: list[MetricSink] = [TensorBoardSink(run_dir / "tensorboard", resume_step)]
    if logging_spec is None:
        return sinks
    ids = _RunIds(run_dir / IDS_FILE)
    project = logging_spec.project or job_name
    try:
        for backend in logging_spec.backends:
            if backend == "mlflow":
                sinks.append(MlflowSink(logging_spec.mlflow_tracking_uri, project, job_name,
                                        run_dir, ids))
            elif backend == "wandb":
                sinks.append(WandbSink(project, job_name, logging_spec.wandb_mode, run_dir, ids))
            else:
                raise TrackingError(f"unknown logging backend '{backend}'; known: mlflow, wandb")
    except BaseException:
        close_all(sinks)
        raise
    return sinks


def write_all(sinks: list[MetricSink], step: int, row: Mapping[str, Any]) -> None:
    """Write to every sink; one that fails is closed and dropped from `sinks`."""
    for sink in list(sinks):
        try:
            sink.write(step, row)
        except Exception as exc:  # noqa: BLE001 - a dashboard must not stop training
            log.warning("metrics sink %s failed (%s: %s); it gets no further steps",
                        type(sink).__name__, type(exc).__name__, exc)
            sinks.remove(sink)
            close_all([sink])


def close_all(sinks: list[MetricSink]) -> None:
    for sink in sinks:
        try:
            sink.close()
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            log.warning("closing metrics sink %s failed: %s", type(sink).__name__, exc)
