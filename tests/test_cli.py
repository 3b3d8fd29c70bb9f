"""The command line as a user meets it: clear errors, never a traceback."""

from __future__ import annotations

from pathlib import Path

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
    # The learner holds the reference (klBeta 0.01) itself: no Service of its own.
    assert services(example) == ["tiny-grpo-actor", "tiny-grpo-reward", "tiny-grpo-learner"]
    no_kl = tmp_path / "no-kl.yaml"
    no_kl.write_text(example.read_text().replace("klBeta: 0.01", "klBeta: 0"))
    assert services(no_kl) == ["tiny-grpo-actor", "tiny-grpo-reward", "tiny-grpo-learner"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(example.read_text().replace("klBeta: 0.01", "klBeta: -1"))
    result = runner.invoke(app, ["manifests", str(bad)])
    assert result.exit_code == 2 and "spec.algorithm.klBeta" in result.output
