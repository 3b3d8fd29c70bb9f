"""The stage table: one answer to "which stages does this job have", read everywhere."""

from __future__ import annotations

import pytest

from rlhfless.api.spec import parse_spec
from rlhfless.api.stages import PHASES, STAGE_NAMES


def table(spec: dict):
    return parse_spec(spec).spec.stages


def test_default_grpo_deploys_no_reference_and_no_critic() -> None:
    stages = table({})
    assert stages.deployed == ("actor", "reward", "trainer")
    assert not stages["reference"].deployed and not stages["critic"].deployed
    assert stages.phases() == (("rollout", ("actor",)), ("score", ("reward",)),
                               ("train", ("trainer",)))


def test_kl_term_deploys_the_reference_and_ppo_the_critic() -> None:
    assert table({"algorithm": {"klBeta": 0.1}}).deployed == (
        "actor", "reference", "reward", "trainer")
    assert table({"algorithm": {"name": "ppo", "klBeta": 0.1}}).deployed == STAGE_NAMES


def test_scale_gpus_and_phases_come_from_the_spec() -> None:
    stages = table({"scheduling": {"maxActors": 7},
                    "resources": {"actor": {"gpus": 4}, "reward": {"gpus": 0}}})
    assert stages["actor"].max_scale == 7 and stages["actor"].gpus == 4
    assert stages["trainer"].max_scale == 1 and stages["reward"].gpus == 0
    assert {s.phase for s in stages} == set(PHASES)
    with pytest.raises(KeyError, match="unknown stage"):
        stages["learner-x"]
