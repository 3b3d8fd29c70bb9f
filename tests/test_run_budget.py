"""`rlhfless run` with a budget and prices: real function processes, the real driver.

A budget too small for a second step stops the run after the first (exit 3, checkpointed);
resuming without raising it starts nothing; raising it lets `--resume` finish. Every step's
row carries the cost keys (split, dollars, tail from the actors' finish times, serverful).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import tiny_job_yaml
from typer.testing import CliRunner

from rlhfless.cli import EXIT_BUDGET, app
from rlhfless.cost import USES
from rlhfless.driver.records import MetricsLog
from rlhfless.store import load_checkpoint

runner = CliRunner()


def job_file(path: Path, budget: str, gpu_type: str = "L4") -> Path:
    path.write_text(tiny_job_yaml("capped", 2, extra=(
        f"  cost: {{gpuType: {gpu_type}, pricing: spot, prices: {{L4: {{spot: 0.36}}}}}}\n"
        f"  budget: {budget}\n")))
    return path


def flat(text: str) -> str:
    return " ".join(text.split())


def test_budget_stops_the_run_and_resume_continues_once_raised(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "job.yaml", "{maxGpuHours: 0.000001}")
    result = runner.invoke(app, ["run", str(job), "--run-dir", str(run_dir)])
    out = flat(result.output)
    assert result.exit_code == EXIT_BUDGET == 3, out
    assert "Budget reached: spec.budget.maxGpuHours" in out and "Traceback" not in out
    assert "Stopped after step 1 of 2 (checkpointed)" in out and "--resume" in out
    assert load_checkpoint(run_dir).step == 1

    [row] = MetricsLog(run_dir / "metrics.jsonl").read()
    # The split accounts for every billed GPU-second of every stage.
    for stage in ("actor", "reference", "reward", "trainer"):
        billed = row.get(f"cost/gpu_seconds/{stage}")
        if billed is not None:
            split = sum(row[f"cost/split/{use}/{stage}"] for use in USES)
            assert split == pytest.approx(billed, rel=1e-6, abs=1e-9), stage
    assert row["cost/dollars"] == pytest.approx(row["cost/gpu_seconds"] * 0.36 / 3600)
    assert row["cost/serverful/gpu_seconds"] > 0 and "cost/saving/gpu_seconds" in row
    # The actors reported when each sample finished: nothing had to be estimated.
    assert row["cost/tail/estimated"] == 0 and 0 <= row["cost/tail/share"] <= 1

    # Resuming with the same budget refuses at once, before any function starts.
    logs = sorted((run_dir / "logs").iterdir())
    started = time.monotonic()
    result = runner.invoke(app, ["run", str(job), "--run-dir", str(run_dir), "--resume"])
    assert result.exit_code == EXIT_BUDGET, result.output
    assert "Budget reached" in flat(result.output)
    assert time.monotonic() - started < 10
    assert sorted((run_dir / "logs").iterdir()) == logs  # no function instance started
    assert len(MetricsLog(run_dir / "metrics.jsonl").read()) == 1

    job_file(job, "{maxGpuHours: 100}")
    result = runner.invoke(app, ["run", str(job), "--run-dir", str(run_dir), "--resume"])
    assert result.exit_code == 0, result.output
    rows = MetricsLog(run_dir / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == [1, 2]
    assert "serverful on the same timings" in flat(result.output)
    # The report of a real run: every figure, the stages' busy lanes from real requests.
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text()
    assert page.count("<svg") == 6 and "Dollars are missing" not in page


def test_validate_warns_about_a_gpu_type_without_a_price(tmp_path: Path) -> None:
    job = job_file(tmp_path / "job.yaml", "{maxDollars: 5}", gpu_type="MI300X")
    result = runner.invoke(app, ["validate", str(job)])
    out = flat(result.output)
    assert result.exit_code == 0, out
    assert "warning: no spot price for GPU type 'MI300X'" in out
    assert "spec.budget.maxDollars cannot be checked" in out


def test_resume_with_an_unreadable_metrics_log_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.json").write_text(
        '{"step": 1, "weights_version": 1, "scheduler": {}, "gpu_seconds_total": 1.0}')
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "cost/gpu_seconds": 1.0}\n{torn')
    job = job_file(tmp_path / "job.yaml", "{maxGpuHours: 1}")
    result = runner.invoke(app, ["run", str(job), "--run-dir", str(run_dir), "--resume"])
    out = flat(result.output)
    assert result.exit_code == 2 and "is not a metrics log" in out, out
    assert "Traceback" not in out
