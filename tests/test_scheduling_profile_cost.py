"""Profile estimation, GPU-second accounting and the prewarm plan."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfless.scheduling.cost import Lifetime, cost_breakdown, union_length
from rlhfless.scheduling.prewarm import prewarm_plan
from rlhfless.scheduling.profile import Profile, ProfileEstimator

# ---------------------------------------------------------------- profile


def test_from_tpot_table_fits_affine_law():
    p = Profile.from_tpot_table({1: 0.0101, 8: 0.0108, 64: 0.0164, 256: 0.0356},
                                cold_start_s=5.0)
    assert p.tpot_base_s == pytest.approx(0.01, abs=1e-4)
    assert p.tpot_per_seq_s == pytest.approx(1e-4, rel=0.02)
    assert p.cold_start_s == 5.0
    flat = Profile.from_tpot_table({4: 0.02, 8: 0.019})  # noisy, decreasing: clip slope to 0
    assert flat.tpot_per_seq_s == 0.0 and flat.tpot_base_s == pytest.approx(0.0195)


def test_profile_validation_and_dict_round_trip():
    p = Profile(max_batch=64, batching="static", gpus_per_actor=2)
    assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    for bad in ({"tpot_base_s": -1}, {"prefill_tok_per_s": 0}, {"max_batch": 0},
                {"batching": "dynamic"}, {"tpot_base_s": 0, "tpot_per_seq_s": 0}):
        with pytest.raises(ValueError):
            Profile(**bad)


def test_estimator_without_data_returns_the_prior():
    prior = Profile(tpot_base_s=0.02, tpot_per_seq_s=1e-4, prefill_tok_per_s=5000,
                    cold_start_s=12.0)
    est = ProfileEstimator(prior)
    got = est.profile()
    assert got.tpot_base_s == pytest.approx(0.02)
    assert got.tpot_per_seq_s == pytest.approx(1e-4)
    assert got.prefill_tok_per_s == pytest.approx(5000)
    assert got.cold_start_s == pytest.approx(12.0)


TRUTH = {"a": 0.004, "c": 2.5e-4, "rate": 1500.0}


def _fitted(n_obs: int, prior_weight: float) -> Profile:
    """Fit exact synthetic timings, starting from a prior 12-27x off in every coefficient."""
    est = ProfileEstimator(Profile(tpot_base_s=0.05, tpot_per_seq_s=1e-5,
                                   prefill_tok_per_s=40_000),
                           prior_weight=prior_weight, forget=1.0)
    rng = np.random.default_rng(0)
    for _ in range(n_obs):
        steps = float(rng.integers(20, 400))
        tokens = steps * float(rng.integers(1, 128)) * rng.uniform(0.5, 1.0)
        prefill = float(rng.integers(100, 5000))
        secs = prefill / TRUTH["rate"] + TRUTH["a"] * steps + TRUTH["c"] * tokens
        est.observe_generation(secs, steps, tokens, prefill)
    return est.profile()


def test_estimator_recovers_true_coefficients():
    got = _fitted(40, prior_weight=0.1)
    assert got.tpot_base_s == pytest.approx(TRUTH["a"], rel=0.1)
    assert got.tpot_per_seq_s == pytest.approx(TRUTH["c"], rel=0.05)
    assert got.prefill_tok_per_s == pytest.approx(TRUTH["rate"], rel=0.05)


def test_estimator_prior_washes_out_with_data():
    errors = [abs(_fitted(n, prior_weight=1.0).tpot_base_s - TRUTH["a"]) for n in (10, 40, 200)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.2 * TRUTH["a"]


def test_estimator_decode_observations_and_cold_starts():
    est = ProfileEstimator(Profile(tpot_base_s=0.01, tpot_per_seq_s=1e-4, cold_start_s=30.0),
                           prior_weight=2.0, forget=1.0)
    for b in (1, 4, 16, 64, 256):
        est.observe_decode(b, 100, 100 * (0.002 + 5e-5 * b))
    for s in (10.0, 12.0):
        est.observe_cold_start(s)
    got = est.profile()
    assert got.tpot_base_s < 0.01 and got.tpot_per_seq_s < 1e-4  # moved toward the truth
    assert got.cold_start_s == pytest.approx((2 * 30 + 10 + 12) / 4)
    est.observe_generation(0.0, 10, 10)  # broken timings are ignored
    est.observe_cold_start(float("nan"))
    assert est.n_generation == 5 and est.n_cold_start == 2


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-3, 100), st.floats(0, 1e3), st.floats(0, 1e5),
                          st.floats(0, 1e4)), max_size=12))
def test_estimator_stays_positive_and_round_trips(observations):
    est = ProfileEstimator()
    for secs, steps, tokens, prefill in observations:
        est.observe_generation(secs, steps, tokens, prefill)
    p = est.profile()
    assert p.tpot_base_s > 0 and p.tpot_per_seq_s > 0 and p.prefill_tok_per_s > 0
    again = ProfileEstimator()
    again.load_state_dict(json.loads(json.dumps(est.state_dict())))
    assert again.profile() == p


# ---------------------------------------------------------------- cost


def test_union_length():
    assert union_length([(0, 2), (1, 3), (5, 6), (6, 7), (4, 4)]) == 5
    assert union_length([]) == 0


def test_cost_breakdown_hand_computed():
    lives = [
        # 2 GPUs, alive 0..100, cold 10 s, busy 10..40 and 30..60 (overlap) → busy 50.
        Lifetime(start=0, end=100, gpus=2, cold_start_s=10, busy=((10, 40), (30, 60))),
        # still alive, clipped to the window end 120; starts before the window at -20.
        Lifetime(start=-20, end=None, gpus=1, cold_start_s=5, busy=((0, 20),)),
    ]
    c = cost_breakdown(lives, 0.0, 120.0)
    assert c.gpu_seconds == 2 * 100 + 1 * 120
    assert c.cold_gpu_seconds == 2 * 10  # the second one's cold start lies before t0
    assert c.busy_gpu_seconds == 2 * 50 + 20
    assert c.idle_gpu_seconds == c.gpu_seconds - c.cold_gpu_seconds - c.busy_gpu_seconds
    assert c.idle_ratio == pytest.approx(1 - 120 / 320)
    assert cost_breakdown([], 0, 1).idle_ratio == 0.0


def test_busy_time_during_cold_start_is_not_counted():
    c = cost_breakdown([Lifetime(0, 10, cold_start_s=4, busy=((0, 10),))], 0, 10)
    assert c.busy_gpu_seconds == 6 and c.cold_gpu_seconds == 4 and c.idle_gpu_seconds == 0


# ---------------------------------------------------------------- prewarm


def test_prewarm_plan_hand_computed():
    durations = {"rollout": 100.0, "score": 20.0, "train": 40.0}
    colds = {"actor": 30.0, "reference": 10.0, "reward": 1.0, "critic": 10.0,
             "trainer": 50.0}
    plan = prewarm_plan(durations, colds)
    # actor: 30 s before rollout = 10 s into train (40 s long)
    assert plan.start_phase["actor"] == "train" and plan.start_offsets["actor"] == 10.0
    # trainer: 50 s before train = 50 s before score ends → 30 s before score starts → 70 s
    # into rollout
    assert plan.start_phase["trainer"] == "rollout"
    assert plan.start_offsets["trainer"] == pytest.approx(70.0)
    assert plan.start_offsets["reference"] == pytest.approx(90.0)
    assert plan.scale_to_zero_after["rollout"] == ["actor"]
    assert plan.keep_warm == [] and all(v == 0 for v in plan.exposed_s.values())


def test_prewarm_keeps_warm_when_the_gap_is_shorter_than_a_restart():
    plan = prewarm_plan({"rollout": 100.0, "score": 5.0, "train": 10.0},
                        {"actor": 30.0, "trainer": 200.0}, margin_s=2.0)
    assert "actor" in plan.keep_warm  # idle 15 s < 30 s cold start + 2 s margin
    assert plan.exposed_s["actor"] == pytest.approx(17.0)
    assert "trainer" in plan.keep_warm and "actor" not in plan.scale_to_zero_after["rollout"]
    # reward has no measured cold start: released, restarted `margin_s` before its phase.
    assert "reward" in plan.scale_to_zero_after["score"]
    assert plan.start_phase["reward"] == "rollout"
    assert plan.start_offsets["reward"] == pytest.approx(98.0)  # just the 2 s margin early


def test_prewarm_rejects_a_stage_in_two_phases():
    with pytest.raises(ValueError):
        prewarm_plan({}, {}, phases=(("a", ("x",)), ("b", ("x",))))
