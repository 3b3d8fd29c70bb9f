"""The command line as a user meets it: clear errors, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_job_yaml
from typer.testing import CliRunner

from rlhfless.cli import app
from rlhfless.driver.records import MetricsLog
from rlhfless.store import load_checkpoint

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_validate_lists_every_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: rlhfless.io/v1alpha1\nkind: RLHFJob\nmetadata: {name: Bad_Name}\n"
                   "spec:\n  algorithm: {name: dpo, clipEps: 0}\n  steps: -1\n  bogus: 1\n")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    out = result.output
    for fragment in ("metadata.name", "lowercase letter", "spec.algorithm.name",
                     "spec.algorithm.clipEps", "spec.steps", "spec.bogus: unknown field"):
        assert fragment in out, fragment
    assert "Traceback" not in out


def test_missing_file_and_broken_yaml_are_clear(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read" in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [")
    result = runner.invoke(app, ["validate", str(broken)])
    assert result.exit_code == 2 and "invalid YAML" in result.output


def test_examples_validate(tmp_path):
    from rlhfless.model.reward_fixture import write_tiny_reward_model

    # A reward model is checked at validate, so the example's reads the one its script makes.
    rm = write_tiny_reward_model(tmp_path / "tiny-rm")
    for example in sorted(EXAMPLES.glob("*.yaml")):
        text = example.read_text()
        if "examples/data/tiny-rm" in text:
            example = tmp_path / example.name
            example.write_text(text.replace("examples/data/tiny-rm", str(rm)))
        result = runner.invoke(app, ["validate", str(example)])
        assert result.exit_code == 0, (example, result.output)


def test_existing_run_is_not_overwritten_silently(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.json").write_text("{}")
    result = runner.invoke(app, ["run", str(EXAMPLES / "tiny-grpo.yaml"), "--run-dir",
                                 str(run_dir)])
    assert result.exit_code == 2 and "--resume" in result.output
    assert (run_dir / "checkpoint.json").exists()


def test_manifests_print_what_the_operator_creates(tmp_path):
    import yaml

    def services(job_file) -> list[str]:
        result = runner.invoke(app, ["manifests", str(job_file), "--namespace", "ml"])
        assert result.exit_code == 0, result.output
        docs = list(yaml.safe_load_all(result.output))
        assert all(d["metadata"]["namespace"] == "ml" for d in docs)
        return [d["metadata"]["name"] for d in docs if d["kind"] == "Service"]

    example = EXAMPLES / "tiny-grpo.yaml"
    # The learner holds the reference (klBeta 0.01) itself: no Service of its own.
    assert services(example) == ["tiny-grpo-actor", "tiny-grpo-reward", "tiny-grpo-learner"]
    no_kl = tmp_path / "no-kl.yaml"
    no_kl.write_text(example.read_text().replace("klBeta: 0.01", "klBeta: 0"))
    assert services(no_kl) == ["tiny-grpo-actor", "tiny-grpo-reward", "tiny-grpo-learner"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(example.read_text().replace("klBeta: 0.01", "klBeta: -1"))
    result = runner.invoke(app, ["manifests", str(bad)])
    assert result.exit_code == 2 and "spec.algorithm.klBeta" in result.output


def _tiny_job_file(tmp_path: Path, name: str, steps: int, extra: str = "") -> Path:
    job = tmp_path / f"{name}.yaml"
    job.write_text(tiny_job_yaml(name, steps, extra=extra))
    return job


def test_a_malformed_checkpoint_stops_resume_before_anything_is_touched(tmp_path):
    job = _tiny_job_file(tmp_path, "bad-cp", 3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = b'{"step": 1}\n{"step": 2}\n'
    (run_dir / "metrics.jsonl").write_bytes(metrics)
    (run_dir / "checkpoint.json").write_text(
        '{"step": -2, "weights_version": 2, "scheduler": {}, "gpu_seconds_total": 1.0}')
    result = runner.invoke(app, ["run", str(job), "--run-dir", str(run_dir), "--resume"])
    out = " ".join(result.output.split())
    assert result.exit_code == 2, out
    assert f"{run_dir / 'checkpoint.json'}: malformed checkpoint" in out
    assert "step: must be a non-negative integer, got -2" in out and "Traceback" not in out
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # nothing truncated
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.json", "metrics.jsonl"]


def test_options_are_validated_like_the_file(tmp_path):
    job = _tiny_job_file(tmp_path, "opts", 3)
    for steps, why in (("0", "greater than or equal to 1"), ("100000000", "less than or equal")):
        result = runner.invoke(app, ["run", str(job), "--steps", steps,
                                     "--run-dir", str(tmp_path / "run")])
        out = " ".join(result.output.split())
        assert result.exit_code == 2 and "--steps: invalid job" in out, out
        assert f"spec.steps: Input should be {why}" in out
    assert not (tmp_path / "run").exists()


def test_a_suspended_job_does_not_run(tmp_path):
    job = _tiny_job_file(tmp_path, "sus", 3, "  suspend: true\n")
    result = runner.invoke(app, ["run", str(job), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "spec.suspend is true" in result.output
    assert not (tmp_path / "run").exists()


def test_ctrl_c_checkpoints_then_exits_130(tmp_path):
    """A real `rlhfless run` in its own process group gets SIGINT, as a terminal's Ctrl-C
    delivers it, once a step is checkpointed: it finishes the step in flight, leaves a
    resumable checkpoint and exits 130."""
    job = _tiny_job_file(tmp_path, "ctrl-c", 500)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhfless.cli", "run", str(job), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no step completed in 240 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (out, err)
    flat = " ".join(err.split())
    assert "Traceback" not in out + err
    step = load_checkpoint(run_dir).step
    assert 1 <= step < 500
    assert f"Stopped after step {step} of 500" in flat and "--resume" in flat
    assert [r["step"] for r in MetricsLog(run_dir / "metrics.jsonl").read()] == list(
        range(1, step + 1))


TINY_JOB = """apiVersion: rlhfless.io/v1alpha1
kind: RLHFJob
metadata: {name: corrupt}
spec:
  model: {source: tiny, tiny: {nLayer: 1, nEmbd: 16, nHead: 2, nPositions: 32}}
  algorithm: {groupSize: 2, lr: 0.003, miniBatchSize: 4}
  dataset: {kind: repeat, size: 2, promptsPerStep: 2}
  reward: {name: target_char, args: {char: "5"}}
  generation: {maxNewTokens: 4}
  scheduling: {actors: 1, maxActors: 1, prewarm: false, keepAliveS: 60}
  steps: 2
"""


@pytest.mark.slow
def test_resume_names_a_corrupt_latest_version_and_falls_back(tmp_path):
    import json

    job_file, run_dir = tmp_path / "job.yaml", tmp_path / "run"
    job_file.write_text(TINY_JOB)
    first = runner.invoke(app, ["run", str(job_file), "--run-dir", str(run_dir)])
    assert first.exit_code == 0, first.output
    latest = run_dir / "store" / "v2" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:-100])  # a truncated write
    again = runner.invoke(app, ["run", str(job_file), "--run-dir", str(run_dir), "--resume",
                                "--steps", "3"], env={"COLUMNS": "1000"})
    assert again.exit_code == 0, again.output
    out = " ".join(again.output.split())
    assert "model.safetensors" in out and "Resuming from step 1" in out
    assert "steps 2–2 run again" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    checkpoint = json.loads((run_dir / "checkpoint.json").read_text())
    # Append-only: the corrupt v2 is never rewritten; the redone steps publish v3 and v4.
    assert checkpoint["step"] == 3 and checkpoint["weights_version"] == 4


def test_resume_without_an_intact_version_prints_the_command(tmp_path):
    from rlhfless.store import Checkpoint, WeightStore, save_checkpoint

    job_file, run_dir = tmp_path / "job.yaml", tmp_path / "run"
    job_file.write_text(TINY_JOB)
    store = WeightStore(run_dir / "store")
    import torch

    store.save(1, {"w": torch.zeros(3)})
    save_checkpoint(run_dir, Checkpoint(step=1, weights_version=1))
    (store.path(1) / "model.safetensors").write_bytes(b"not weights")
    result = runner.invoke(app, ["run", str(job_file), "--run-dir", str(run_dir), "--resume"],
                           env={"COLUMNS": "1000"})
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "model.safetensors" in out
    assert f"rlhfless run {job_file} --overwrite" in out
    assert "--resume" not in out.split("start again with:")[-1]
