"""The command line as a user meets it: clear errors, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhfless.cli import app

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_validate_lists_every_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: rlhfless.io/v1alpha1\nkind: RLHFJob\nmetadata: {name: Bad_Name}\n"
                   "spec:\n  algorithm: {name: dpo, clipEps: 0}\n  steps: -1\n  bogus: 1\n")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    out = result.output
    for fragment in ("metadata.name", "[a-z0-9]", "spec.algorithm.name", "spec.algorithm.clipEps",
                     "spec.steps", "spec.bogus: unknown field"):
        assert fragment in out, fragment
    assert "Traceback" not in out


def test_missing_file_and_broken_yaml_are_clear(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read" in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [")
    result = runner.invoke(app, ["validate", str(broken)])
    assert result.exit_code == 2 and "invalid YAML" in result.output


def test_examples_validate():
    for example in sorted(EXAMPLES.glob("*.yaml")):
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
    assert services(example) == ["tiny-grpo-actor", "tiny-grpo-reference", "tiny-grpo-reward",
                                 "tiny-grpo-trainer"]  # klBeta 0.01: the KL term needs it
    no_kl = tmp_path / "no-kl.yaml"
    no_kl.write_text(example.read_text().replace("klBeta: 0.01", "klBeta: 0"))
    assert services(no_kl) == ["tiny-grpo-actor", "tiny-grpo-reward", "tiny-grpo-trainer"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(example.read_text().replace("klBeta: 0.01", "klBeta: -1"))
    result = runner.invoke(app, ["manifests", str(bad)])
    assert result.exit_code == 2 and "spec.algorithm.klBeta" in result.output


TINY_JOB = """apiVersion: rlhfless.io/v1alpha1
kind: RLHFJob
metadata: {name: corrupt}
spec:
  model: {source: tiny, tiny: {nLayer: 1, nEmbd: 16, nHead: 2, nPositions: 32}}
  algorithm: {groupSize: 2, lr: 0.003, miniBatchSize: 64}
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
