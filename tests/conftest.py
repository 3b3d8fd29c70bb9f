"""Shared fixtures: tiny job specs and a materialised tiny weight store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rlhfless.api.spec import RLHFJob, parse_job

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two shared cores: one intra-op thread per test process is much faster than contention.
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def tiny_job(name: str = "t", **spec_overrides: object) -> RLHFJob:
    """A tiny GRPO job (char model, toy reward) with nested overrides merged in."""
    spec: dict[str, object] = {
        "model": {"source": "tiny", "tiny": {"nLayer": 1, "nEmbd": 32, "nHead": 2,
                                              "nPositions": 96, "seed": 0}},
        "algorithm": {"name": "grpo", "groupSize": 4, "lr": 0.003, "klBeta": 0.01},
        "dataset": {"kind": "repeat", "size": 4, "promptsPerStep": 4},
        "reward": {"name": "target_char", "args": {"char": "5"}},
        "generation": {"maxNewTokens": 8},
        "scheduling": {"actors": 2, "maxActors": 2, "keepAliveS": 60},
        "steps": 2,
    }
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}  # type: ignore[dict-item]
        else:
            spec[key] = value
    algorithm: dict = spec["algorithm"]  # type: ignore[assignment]
    # One optimizer step over the whole batch unless a test asks for mini-batches.
    algorithm.setdefault("miniBatchSize", algorithm["groupSize"]
                         * spec["dataset"]["promptsPerStep"])  # type: ignore[index]
    return parse_job({"apiVersion": "rlhfless.io/v1alpha1", "kind": "RLHFJob",
                      "metadata": {"name": name}, "spec": spec})


TARGET_CHAR_REWARD = '{name: target_char, args: {char: "5"}}'
ONE_ACTOR = "{actors: 1, maxActors: 1, keepAliveS: 60}"


def tiny_job_yaml(name: str, steps: int, *, reward: str = TARGET_CHAR_REWARD,
                  scheduling: str = ONE_ACTOR, extra: str = "") -> str:
    """The job file the CLI end-to-end tests run (a 1-layer model, 2 prompts x 4 samples);
    `extra` is more `spec:` lines, each indented by two spaces."""
    return f"""apiVersion: rlhfless.io/v1alpha1
kind: RLHFJob
metadata: {{name: {name}}}
spec:
  model: {{source: tiny, tiny: {{nLayer: 1, nEmbd: 32, nHead: 2, nPositions: 64}}}}
  algorithm: {{groupSize: 4, lr: 0.003, miniBatchSize: 8}}
  dataset: {{kind: repeat, size: 2, promptsPerStep: 2}}
  reward: {reward}
  generation: {{maxNewTokens: 8}}
  scheduling: {scheduling}
  steps: {steps}
{extra}"""


@pytest.fixture
def tiny_store(tmp_path: Path):
    from rlhfless.model.materialize import materialize_base
    from rlhfless.store import WeightStore

    job = tiny_job()
    store = WeightStore(tmp_path / "store")
    materialize_base(job.spec.model, store)
    return job, store
