"""The stage table: one answer to "which stages does this job have", read everywhere."""

from __future__ import annotations

import pytest

from rlhfless.api.spec import SpecError, parse_spec
from rlhfless.api.stages import PHASES, STAGE_NAMES, learner_parts


def table(spec: dict):
    return parse_spec(spec).spec.stages


RM = {"name": "reward_model", "model": {"path": "/models/rm"}}


def test_every_job_has_actor_reward_and_the_fused_learner() -> None:
    assert STAGE_NAMES == ("actor", "reward", "scorer", "learner")
    for spec in ({}, {"algorithm": {"klBeta": 0.1}}, {"algorithm": {"name": "ppo"}}):
        stages = table(spec)
        assert stages.deployed == ("actor", "reward", "learner")
        assert stages.reward_stage == "reward" and not stages.has("scorer")
    assert stages.phases() == (("rollout", ("actor",)), ("learn", ("reward", "learner")))


def test_a_reward_model_job_scores_in_the_scorer_instead_of_the_reward_stage() -> None:
    stages = table({"reward": RM, "resources": {"scorer": {"gpus": 2}}})
    assert stages.deployed == ("actor", "scorer", "learner")
    assert stages.reward_stage == "scorer" and not stages.has("reward")
    assert stages.phases() == (("rollout", ("actor",)), ("learn", ("scorer", "learner")))
    assert stages["scorer"].gpus == 2 and stages["scorer"].max_scale == 2
    # Its model is not shaped like the policy: the memory plan does not size it.
    assert stages["scorer"].holds == ()
    assert table({"reward": RM})["scorer"].gpus == 1  # a GPU stage by default, as the learner


def test_the_learner_holds_the_reference_only_with_a_kl_term_and_the_critic_for_ppo() -> None:
    assert learner_parts(parse_spec({}).spec) == ("policy",)
    assert learner_parts(parse_spec({"algorithm": {"klBeta": 0.1}}).spec) == (
        "policy", "reference")
    assert learner_parts(parse_spec({"algorithm": {"name": "ppo", "klBeta": 0.1}}).spec) == (
        "policy", "reference", "critic")


def test_scale_gpus_and_phases_come_from_the_spec() -> None:
    stages = table({"scheduling": {"maxActors": 7},
                    "resources": {"actor": {"gpus": 4}, "learner": {"gpus": 2}}})
    assert stages["actor"].max_scale == 7 and stages["actor"].gpus == 4
    assert stages["learner"].max_scale == 1 and stages["learner"].gpus == 2
    assert stages["reward"].gpus == 0 and stages["reward"].max_scale == 2
    assert {s.phase for s in stages} == set(PHASES)
    with pytest.raises(KeyError, match="unknown stage"):
        stages["trainer"]


@pytest.mark.parametrize("old", ["trainer", "reference", "critic"])
def test_resources_of_stages_that_no_longer_exist_are_refused_by_name(old: str) -> None:
    with pytest.raises(SpecError, match=f"spec.resources.{old}: unknown field"):
        parse_spec({"resources": {old: {"gpus": 1}}})


def test_every_stage_name_fits_the_suffix_reserved_in_job_names() -> None:
    from rlhfless.api.names import STAGE_SUFFIX_RESERVE

    assert all(len(f"-{name}") <= STAGE_SUFFIX_RESERVE for name in STAGE_NAMES)
