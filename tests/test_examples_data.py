"""The parquet examples: their generated data, their rewards, one real step of each (tiny)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from rlhfless.api.spec import parse_job
from rlhfless.api.wire import RewardRequest
from rlhfless.driver import Driver
from rlhfless.driver.records import MetricsLog
from rlhfless.functions.reward import RewardHandler
from rlhfless.model.reward_config import reward_model_errors
from rlhfless.rewards import load_dataset, reward_meta
from rlhfless.rewards.samples import REFERENCE_PROGRAMS, write_samples
from rlhfless.runtime.local import LocalRuntime
from tests.conftest import REPO
from tests.test_tracking import scalar_series

EXAMPLES = {"gsm8k": "gsm8k-parquet-grpo.yaml", "code": "code-grpo.yaml"}


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, Path]:
    return write_samples(tmp_path_factory.mktemp("data"))


def example(name: str, data: dict[str, Path], **overrides: dict) -> object:
    """The checked-in example, reading the generated file instead of examples/data/."""
    doc = yaml.safe_load((REPO / "examples" / EXAMPLES[name]).read_text())
    assert doc["spec"]["dataset"]["path"] == f"examples/data/{data[name].name}"
    doc["spec"]["dataset"]["path"] = str(data[name])
    for key, value in overrides.items():
        doc["spec"][key] = {**doc["spec"].get(key, {}), **value}
    return parse_job(doc)


def test_make_example_data_writes_what_the_examples_read(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "scripts" / "make_example_data.py"),
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "choice.jsonl", "code-tests.parquet", "gsm8k-verl.parquet", "tiny-rm"]
    # What examples/reward-model-grpo.yaml reads: a reward model its validation accepts.
    doc = yaml.safe_load((REPO / "examples" / "reward-model-grpo.yaml").read_text())
    assert doc["spec"]["reward"]["model"]["path"] == "examples/data/tiny-rm"
    doc["spec"]["reward"]["model"]["path"] = str(tmp_path / "tiny-rm")
    assert reward_model_errors(parse_job(doc).spec.reward) == []


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_validate_with_their_data(samples, name):
    job = example(name, samples)
    assert job.spec.model.source == "gguf" and job.spec.model.path == "smollm2"
    assert job.spec.dataset.kind == "parquet"
    items = load_dataset(job.spec.dataset, job.spec.reward)
    assert items and all(item["messages"][-1]["role"] == "user" for item in items)


def _reward_request(items: list[dict], responses: list[str]) -> RewardRequest:
    return RewardRequest.model_validate({"request_id": "r", "items": [
        {"prompt": i["prompt"], "response": r, "meta": reward_meta(i)}
        for i, r in zip(items, responses, strict=True)]})


def test_reward_path_scores_perfect_answers_1_and_wrong_ones_0(samples):
    job = example("gsm8k", samples)
    items = load_dataset(job.spec.dataset, job.spec.reward)[:8]
    handler = RewardHandler(job.spec.reward)
    right = [f"Step by step... so the answer is \\boxed{{{i['answer']}}}" for i in items]
    wrong = [f"#### {int(i['answer']) + 1}" for i in items]
    assert handler.handle(_reward_request(items, right)).rewards == [1.0] * 8
    assert handler.handle(_reward_request(items, wrong)).rewards == [0.0] * 8

    job = example("code", samples)
    items = load_dataset(job.spec.dataset, job.spec.reward)
    handler = RewardHandler(job.spec.reward)
    programs = [f"```python\n{p}\n```" for p in REFERENCE_PROGRAMS]
    assert handler.handle(_reward_request(items, programs)).rewards == [1.0] * len(items)
    shifted = programs[1:] + programs[:1]  # each problem gets another problem's program
    assert max(handler.handle(_reward_request(items, shifted)).rewards) < 1.0

    from rlhfless.api.spec import DatasetSpec, RewardSpec

    reward = RewardSpec(name="multiple_choice", args={"choices": "ABCD"})
    items = load_dataset(DatasetSpec(kind="jsonl", path=str(samples["choice"])), reward)
    answers = [f"The answer is ({i['answer']})" for i in items]
    assert RewardHandler(reward).handle(_reward_request(items, answers)).rewards == \
        [1.0] * len(items)


TINY = {
    "model": {"source": "tiny", "path": None,
              "tiny": {"nLayer": 1, "nEmbd": 32, "nHead": 2, "nPositions": 512}},
    "algorithm": {"groupSize": 2, "miniBatchSize": 4, "lr": 0.001, "klBeta": 0.0},
    "dataset": {"promptsPerStep": 2},
    "generation": {"maxNewTokens": 8},
    "scheduling": {"actors": 1, "maxActors": 1, "prewarm": False, "keepAliveS": 60},
    "steps": 1,
}


def test_one_step_of_a_tiny_gsm8k_variant_through_the_local_runtime(samples, tmp_path):
    """verl parquet → chat prompt → actor → reward function (math-verify workers in its own
    process) → trainer → metrics.jsonl and TensorBoard. (~12 s on 2 idle cores. The code
    example's step differs only in its reward, which a random model's text never reaches
    past compilation; its reward path is tested above with real programs.)"""
    job = example("gsm8k", samples, **{k: v for k, v in TINY.items() if k != "steps"})
    job.spec.steps = 1

    async def run() -> int:
        async with LocalRuntime(job, tmp_path / "store", tmp_path) as runtime:
            return await Driver(job, runtime, tmp_path).run()

    assert asyncio.run(run()) == 1
    (row,) = MetricsLog(tmp_path / "metrics.jsonl").read()
    # A random char-level model does not write the right answer.
    assert row["reward/mean"] == 0.0 and row["weights_version"] == 1
    assert "timing_s/reward" in row
    # The TensorBoard event file holds the same keys as metrics.jsonl.
    series = scalar_series(tmp_path / "tensorboard")
    expected = {k for k, v in row.items()
                if k != "step" and isinstance(v, int | float) and v == v}
    assert set(series) == expected
    assert series["reward/mean"] == {1: 0.0}
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("reward*"))
    assert "Traceback" not in logs, logs[-2000:]
    json.loads((tmp_path / "checkpoint.json").read_text())
