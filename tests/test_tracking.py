"""Metric sinks: TensorBoard event files (read back), MLflow and W&B offline, sink failures."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhfless.api.spec import LoggingSpec
from rlhfless.driver.records import MetricsLog, StepRecord
from rlhfless.driver.tracking import (
    IDS_FILE,
    TensorBoardSink,
    TrackingError,
    open_sinks,
    scalars,
)


def read_events(logdir: Path) -> list:
    """Every event in `logdir`'s event files, checking each record's masked CRC32C (what
    TensorBoard's reader does)."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            header = raw[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", raw[pos + 8:pos + 12])
            assert header_crc == masked(header), f"{path}: bad length CRC at {pos}"
            data = raw[pos + 12:pos + 12 + length]
            (data_crc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
            assert data_crc == masked(data), f"{path}: bad data CRC at {pos}"
            event = Event()
            event.ParseFromString(data)
            events.append(event)
            pos += 16 + length
    return events


def scalar_series(logdir: Path) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for event in read_events(logdir):
        for value in event.summary.value:
            series.setdefault(value.tag, {})[event.step] = value.simple_value
    return series


def _record(step: int, reward: float) -> StepRecord:
    return StepRecord(
        step=step, reward_mean=reward, gpu_seconds_total=float(step), weights_version=step,
        checkpoint="c", metrics={"reward/mean": reward, "timing_s/gen": 0.25 * step,
                                 "sched/table/n2/score": 1.5, "perf/bad": float("nan")},
        timeline=[{"stage": "actor", "start": 0.0, "end": 1.0}],
    )


def test_scalars_keep_the_jsonl_numbers_only():
    row = {"step": 3, "weights_version": 3, "a/b": 1, "flag": True, "nan": float("nan"),
           "timeline": [{"x": 1}], "name": "x"}
    assert scalars(row) == {"weights_version": 3.0, "a/b": 1.0}


def test_tensorboard_events_hold_the_metrics_jsonl_keys(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", open_sinks(None, "job", tmp_path))
    for step in (1, 2, 3):
        log.append(_record(step, 0.1 * step))
    log.close()
    series = scalar_series(tmp_path / "tensorboard")
    rows = log.read()
    # Every number but the step (NaN is not plotted; timelines are lists, not scalars).
    jsonl_keys = {k for r in rows for k, v in r.items()
                  if k != "step" and isinstance(v, int | float) and v == v}
    assert set(series) == jsonl_keys
    assert series["reward/mean"] == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})
    assert series["timing_s/gen"] == pytest.approx({1: 0.25, 2: 0.5, 3: 0.75})
    assert series["weights_version"] == {1: 1.0, 2: 2.0, 3: 3.0}


def test_resumed_run_purges_steps_after_the_checkpoint(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb")
    for step in (1, 2, 3):
        sink.write(step, {"reward/mean": float(step)})
    sink.close()
    resumed = TensorBoardSink(tmp_path / "tb", resume_step=2)  # step 3 is redone
    resumed.write(3, {"reward/mean": 30.0})
    resumed.close()
    starts = [e.step for e in read_events(tmp_path / "tb")
              if e.HasField("session_log") and e.session_log.status == 1]  # START
    assert starts == [3]  # TensorBoard hides the first run's events from step 3 on


class _Broken:
    closed = False

    def write(self, step, row):
        raise OSError("disk full")

    def close(self):
        self.closed = True


def test_a_failing_sink_is_dropped_and_training_goes_on(tmp_path, caplog):
    broken = _Broken()
    log = MetricsLog(tmp_path / "metrics.jsonl", [broken])
    log.append(_record(1, 0.5))
    log.append(_record(2, 0.6))
    assert [r["step"] for r in log.read()] == [1, 2]  # the jsonl is complete
    assert broken.closed and log.sinks == []
    assert "disk full" in caplog.text


def test_logging_spec_refuses_unknown_and_repeated_backends():
    from rlhfless.api.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="logging.backends"):
        parse_spec({"logging": {"backends": ["tensorboard"]}})
    with pytest.raises(SpecError, match="twice"):
        parse_spec({"logging": {"backends": ["mlflow", "mlflow"]}})


def test_missing_tracker_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_trackers(name, *args, **kwargs):
        if name.split(".")[0] in ("mlflow", "wandb"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_trackers)
    for backend in ("mlflow", "wandb"):
        spec = LoggingSpec(backends=[backend])
        with pytest.raises(TrackingError, match=rf"rlhfless\[{backend}\]"):
            open_sinks(spec, "job", tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None,
    reason="mlflow is not installed (optional extra: pip install 'rlhfless[mlflow]')")
def test_mlflow_file_store_under_the_run_dir(tmp_path):
    from mlflow.tracking import MlflowClient

    spec = LoggingSpec(backends=["mlflow"], project="exp")
    log = MetricsLog(tmp_path / "metrics.jsonl", open_sinks(spec, "job", tmp_path))
    log.append(_record(1, 0.5))
    log.close()
    # A resumed job logs into the same MLflow run.
    log = MetricsLog(tmp_path / "metrics.jsonl", open_sinks(spec, "job", tmp_path, 1))
    log.append(_record(2, 0.75))
    log.close()
    run_id = json.loads((tmp_path / IDS_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    history = client.get_metric_history(run_id, "reward/mean")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.75)]
    assert set(client.get_run(run_id).data.metrics) == set(scalars(log.read()[-1]))
    assert client.get_experiment_by_name("exp") is not None


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None,
    reason="wandb is not installed (optional extra: pip install 'rlhfless[wandb]')")
def test_wandb_offline_run_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = LoggingSpec(backends=["wandb"], project="proj")
    sinks = open_sinks(spec, "job", tmp_path)
    log = MetricsLog(tmp_path / "metrics.jsonl", sinks)
    log.append(_record(1, 0.5))
    log.append(_record(2, 0.75))
    run = sinks[-1].run
    assert run.offline and run.project == "proj" and run.name == "job"
    summary = dict(run.summary)
    log.close()
    assert summary["reward/mean"] == 0.75 and summary["timing_s/gen"] == 0.5
    run_id = json.loads((tmp_path / IDS_FILE).read_text())["wandb"]
    offline = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and list(offline[0].glob("*.wandb")), "no offline run file written"


def test_driver_wires_the_sinks(tmp_path):
    """The driver opens the sinks when it starts and closes them at the end (no runtime
    needed for this: `prepare` + a step record appended)."""
    from rlhfless.driver import Driver
    from tests.conftest import tiny_job

    driver = Driver(tiny_job("tb"), SimpleNamespace(), tmp_path)
    driver.prepare()
    assert [type(s).__name__ for s in driver.metrics_log.sinks] == ["TensorBoardSink"]
    driver.metrics_log.append(_record(1, 0.5))
    driver.metrics_log.close()
    assert scalar_series(tmp_path / "tensorboard")["reward/mean"] == {1: 0.5}
