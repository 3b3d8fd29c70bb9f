"""The driver's Planner: the simulator's planning code (scheduling.planning, plan_step) fed
with what the real runs measure, its state in the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_job

from rlhfless.api.wire import RolloutSample
from rlhfless.driver.planner import Planner
from rlhfless.driver.rollout import PromptItem, RolloutResult
from rlhfless.runtime.base import InstanceUsage
from rlhfless.scheduling.planning import planning_workload, prewarm_margin
from rlhfless.scheduling.predictor import LengthPredictor
from rlhfless.scheduling.step import plan_step
from rlhfless.scheduling.units import bin_entries

G = 4


def items(n: int, prompt_len: int = 6) -> list[PromptItem]:
    return [PromptItem(key=f"p{i}", text=f"q{i}", prompt_ids=list(range(prompt_len)), meta={})
            for i in range(n)]


def rollout(prompts: list[PromptItem], lengths: dict[str, list[int]], t0: float,
            ended_s: float) -> RolloutResult:
    samples = {p.key: [RolloutSample(key=p.key, index=i, response=np.ones(n, dtype="<i4"),
                                     logprobs=np.zeros(n, dtype="<f4"), finished=True)
                       for i, n in enumerate(lengths[p.key])] for p in prompts}
    done = {p.key: t0 + ended_s * (k + 1) / len(prompts) for k, p in enumerate(prompts)}
    return RolloutResult(samples=samples, actor_stats=[{"generate_s": ended_s,
                                                        "decode_steps": 30.0,
                                                        "tokens": 400.0,
                                                        "prompt_tokens": 48.0}],
                         group_done_at=done, ended_at=t0 + ended_s)


def job(**scheduling: object):
    return tiny_job(scheduling={"actors": 2, "maxActors": 4, "keepAliveS": 60, **scheduling},
                    generation={"maxNewTokens": 60}).spec


def test_plans_with_the_same_code_and_inputs_as_the_simulator() -> None:
    spec = job()
    planner = Planner(spec)
    prompts = items(8)
    long = {p.key: [50, 50, 50, 50] if k < 2 else [5, 5, 5, 40] for k, p in enumerate(prompts)}
    planner.predictor.observe([p.key for p in prompts], [long[p.key] for p in prompts])
    plan = planner.plan(prompts, warm_actors=0)
    # The same call the simulator makes (sim.serverless._plan_step), from the same inputs.
    mean, longest = planner.predictor.predict([p.key for p in prompts])
    square = planner.predictor.predict_square([p.key for p in prompts])
    prompt_tokens = np.full(8, 6.0)
    expected = plan_step(planning_workload(mean, longest, G, prompt_tokens, mean_square=square),
                         prompt_tokens + G * mean, planner.profile.profile(),
                         planner._learner(), lam=spec.scheduling.lam, max_actors=4,
                         handoff_tau=spec.scheduling.tau, arrival_curve=planner.arrivals,
                         margin_s=prewarm_margin({}), policy="length-aware", seed=spec.seed,
                         split_groups=True)
    assert plan.n_actors == expected.n
    assert plan.bins == bin_entries(expected.units, expected.bins, G)
    # every sample once, whole groups as plain indices
    seen = sorted((e, i) if isinstance(e, int) else (e[0], i)
                  for b in plan.bins for e in b
                  for i in (range(G) if isinstance(e, int) else e[1]))
    assert seen == [(k, i) for k in range(8) for i in range(G)]
    assert plan.decisions["sched/actors"] == plan.n_actors
    assert {f"sched/table/n{row.n}/time_s" for row in expected.table} <= set(plan.decisions)
    # The longest-sample EWMA is what the plan reads, not only the mean: a group with one
    # long sample is planned longer than its mean says.
    assert longest[2] == pytest.approx(40) and mean[2] == pytest.approx(13.75)


def test_a_fixed_actor_count_without_cost_awareness() -> None:
    planner = Planner(job(costAware=False, actors=3))
    plan = planner.plan(items(8))
    assert plan.n_actors == 3 and len(plan.bins) == 3
    assert [k for k in plan.decisions if k.startswith("sched/table/")] == [
        f"sched/table/n3/{x}" for x in ("time_s", "gpu_seconds", "score", "rollout_s")]


def test_observing_steps_teaches_lengths_learner_speed_arrivals_and_the_rollout_ratio() -> None:
    planner = Planner(job())
    prompts = items(6)
    lengths = {p.key: [10, 12, 14, 40] for p in prompts}
    t0 = 1000.0
    for step in range(3):
        plan = planner.plan(prompts)
        usages = [InstanceUsage("actor", f"actor-{step}", 1, t0, None, 2.0),
                  InstanceUsage("learner", f"learner-{step}", 1, t0, None, 3.0)]
        metrics = planner.observe(prompts, rollout(prompts, lengths, t0, 4.0), usages,
                                  {"rollout": 4.0, "learn": 1.0}, t0,
                                  {"add_s": 0.6, "ref_s": 0.1, "update_s": 0.3})
        assert metrics["sched/actual/rollout_s"] == pytest.approx(4.0)
        assert metrics["sched/plan/rollout_error"] == pytest.approx(4.0 / plan.rollout_s - 1)
        if step == 0:
            assert planner.ratio.ratio is None  # planned from guesses: nothing to learn
    # The ratio now corrects the model's plans towards what the rollouts really take.
    assert planner.ratio.ratio is not None
    mean, longest = planner.predictor.predict(["p0"])
    assert mean[0] == pytest.approx(19.0) and longest[0] == pytest.approx(40.0)
    tokens = 6 * 6 + 6 * (10 + 12 + 14 + 40)
    assert planner.learner_s_per_token == pytest.approx(1.0 / tokens)
    assert planner.learner_finish_s == pytest.approx(0.3)
    assert planner.arrivals.known
    assert planner.cold_start_s == {"actor": 2.0, "learner": 3.0}
    assert planner.prewarm().start_phase or planner.prewarm().keep_warm


def test_state_round_trips_and_old_checkpoints_still_load() -> None:
    planner = Planner(job())
    prompts = items(4)
    planner.plan(prompts)
    planner.observe(prompts, rollout(prompts, {p.key: [8, 9, 10, 30] for p in prompts},
                                     0.0, 2.0), [], {"rollout": 2.0}, 0.0, {"add_s": 0.2})
    state = planner.state_dict()
    again = Planner(job(), state)
    assert again.state_dict() == state
    assert again.plan(prompts).bins == planner.plan(prompts).bins
    # A checkpoint written before the planner learnt maxima, the ratio and arrivals.
    old = LengthPredictor(alpha=0.5)
    old.update(["p0"], [12.0])
    legacy = Planner(job(), {"predictor": old.state_dict(),
                             "profile": planner.profile.state_dict(),
                             "phase_s": {"rollout": 1.0}, "cold_start_s": {}})
    assert legacy.predictor.predict(["p0"])[0][0] == pytest.approx(12.0)
    assert legacy.ratio.ratio is None and not legacy.arrivals.known
