"""Planner inputs shared by the driver and the simulator: group lengths, work units, profiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhfless.scheduling.planning import (
    GroupLengthPredictor,
    RatioTracker,
    ewma,
    planning_workload,
    prewarm_margin,
)
from rlhfless.scheduling.predictor import LengthPredictor
from rlhfless.scheduling.profile import Profile, ProfileEstimator
from rlhfless.scheduling.workmodel import (
    Workload,
    context_tokens,
    spread_lengths,
    unit_finish_times,
)


def test_group_predictor_tracks_mean_and_longest_and_round_trips():
    p = GroupLengthPredictor(alpha=0.5, prior=100.0)
    mean, top = p.predict(["a", "b"])
    assert list(mean) == [100.0, 100.0] and list(top) == [100.0, 100.0]
    p.observe(["a", "b"], [[10, 30], [5, 5, 200]])  # ragged groups are fine
    p.observe(["a", "b"], [[20, 20], [5, 5, 5]])
    mean, top = p.predict(["a", "b", "new"])
    assert mean[0] == pytest.approx(0.5 * 20 + 0.5 * 20)
    assert top[0] == pytest.approx(0.5 * 20 + 0.5 * 30)
    assert top[1] == pytest.approx(0.5 * 5 + 0.5 * 200) and np.all(top >= mean)
    back = GroupLengthPredictor()
    back.load_state_dict(json.loads(json.dumps(p.state_dict())))
    for x, y in zip(back.predict(["a", "b", "new"]), p.predict(["a", "b", "new"]), strict=True):
        assert np.allclose(x, y)
    assert p.known_fraction(["a", "zzz"]) == 0.5


def test_group_predictor_loads_a_mean_only_state_and_rejects_bad_groups():
    old = LengthPredictor(alpha=0.5)
    old.update(["a"], [40.0])
    p = GroupLengthPredictor()
    p.load_state_dict(old.state_dict())  # a checkpoint from before the max EWMA existed
    mean, top = p.predict(["a"])
    assert mean[0] == top[0] == 40.0
    with pytest.raises(ValueError, match="at least one"):
        p.observe(["a"], [[]])
    with pytest.raises(ValueError, match="groups of lengths"):
        p.observe(["a", "b"], [[1.0]])


def test_planning_workload_reads_more_context_for_a_long_sample():
    mean, top, prompt = np.array([1000.0]), np.array([8000.0]), np.array([100.0])
    spread = planning_workload(mean, top, 16, prompt)
    flat = Workload.groups(mean, 16, prompt, context=True)  # every sample at the mean
    assert spread.lmax[0] == 8000.0 and spread.tokens[0] == 16_000.0
    assert spread.ctx[0] > 2 * flat.ctx[0]  # reads grow with the square of a length
    unit, lengths = spread_lengths(spread.lmax, spread.tokens, spread.seqs)
    assert lengths.sum() == pytest.approx(16_000.0) and lengths.max() == 8000.0
    assert spread.ctx[0] == pytest.approx(context_tokens(100.0, lengths).sum())
    assert np.all(planning_workload(mean, top, 16, prompt, context=False).ctx == 0)
    assert planning_workload(mean, None, 16, prompt).lmax[0] == 1000.0


def test_prewarm_margin_ewma_and_ratio_tracker():
    assert prewarm_margin({"actor": 10.0, "learner": 14.0}) == 7.0
    assert prewarm_margin({}) == 0.0
    assert ewma(None, 3.0) == 3.0 and ewma(2.0, 4.0, 0.25) == 2.5
    r = RatioTracker(alpha=0.5, limit=2.0)
    assert r.correct(100.0) == 100.0
    r.observe(10.0, 500.0)  # a step planned from the prior: clipped to 2x
    assert r.ratio == 2.0
    r.observe(100.0, 100.0)
    assert r.correct(100.0) == pytest.approx(150.0)
    back = RatioTracker()
    back.load_state_dict(json.loads(json.dumps(r.state_dict())))
    assert back.correct(10.0) == r.correct(10.0)


def test_profile_from_tpot_samples_recovers_the_law_and_stays_nonnegative():
    a, c, k = 0.008, 2e-5, 2e-8
    rows = [(b, b * ctx, a + c * b + k * b * ctx) for b in (1, 8, 64) for ctx in (0, 1e3, 8e3)]
    p = Profile.from_tpot_samples(rows, cold_start_s=3.0)
    assert (p.tpot_base_s, p.tpot_per_seq_s, p.tpot_per_ctx_s) == pytest.approx((a, c, k))
    assert p.cold_start_s == 3.0
    flat = Profile.from_tpot_samples([(b, 0.0, 0.01 - 1e-6 * b) for b in (1, 10, 100)])
    assert flat.tpot_per_seq_s == 0.0 and flat.tpot_per_ctx_s == 0.0
    with pytest.raises(ValueError, match="rows of"):
        Profile.from_tpot_samples([(1, 2)])


def test_estimator_learns_the_context_term_only_when_reported():
    truth = Profile(tpot_base_s=0.01, tpot_per_seq_s=1e-4, prefill_tok_per_s=1e4,
                    tpot_per_ctx_s=5e-8)
    est = ProfileEstimator(prior=Profile(tpot_base_s=0.02, tpot_per_seq_s=2e-4,
                                         prefill_tok_per_s=5e3, tpot_per_ctx_s=1e-8),
                           prior_weight=0.1, forget=1.0)
    rng = np.random.default_rng(0)
    for _ in range(60):
        steps, tokens = rng.uniform(100, 2000), rng.uniform(1e3, 1e5)
        pre, ctx = rng.uniform(0, 5e3), rng.uniform(1e5, 1e8)
        seconds = (pre / truth.prefill_tok_per_s + truth.tpot_base_s * steps
                   + truth.tpot_per_seq_s * tokens + truth.tpot_per_ctx_s * ctx)
        est.observe_generation(seconds, steps, tokens, pre, ctx)
    got = est.profile()
    assert got.tpot_per_ctx_s == pytest.approx(truth.tpot_per_ctx_s, rel=0.05)
    assert got.tpot_base_s == pytest.approx(truth.tpot_base_s, rel=0.05)
    # an engine that never reports context keeps the prior's coefficient
    plain = ProfileEstimator(prior=Profile(tpot_per_ctx_s=3e-8))
    plain.observe_generation(1.0, 100, 1000, 0.0)
    assert plain.profile().tpot_per_ctx_s == pytest.approx(3e-8)


def test_estimator_loads_a_state_saved_without_the_context_coefficient():
    est = ProfileEstimator()
    est.observe_generation(2.0, 100, 1000, 50)
    state = est.state_dict()
    state["xtx"] = [row[:3] for row in state["xtx"][:3]]
    state["xty"] = state["xty"][:3]
    back = ProfileEstimator()
    back.load_state_dict(state)
    assert back.profile().tpot_base_s == pytest.approx(est.profile().tpot_base_s)


def test_kv_capacity_term_and_unit_finish_times():
    prof = Profile(tpot_base_s=0.01, tpot_per_seq_s=1e-4, prefill_tok_per_s=1e4,
                   tpot_per_ctx_s=1e-8)
    w = planning_workload([200.0, 800.0, 3000.0], [400.0, 1500.0, 6000.0], 8,
                          [50.0, 50.0, 50.0])
    capped = Profile(**{**prof.to_dict(), "kv_tokens": float(w.ctx.sum() / 10_000)})
    from rlhfless.scheduling.workmodel import bin_time, lower_bound, makespan

    assert bin_time(w, [0, 1, 2], capped) > bin_time(w, [0, 1, 2], prof)
    for p in (prof, capped):
        finish = unit_finish_times(w, [[0, 1, 2]], p)
        assert finish.max() == pytest.approx(bin_time(w, [0, 1, 2], p))
        assert finish[0] < finish[1] < finish[2]  # shorter groups are done earlier
        assert lower_bound(w, 2, p) <= makespan(w, [[2], [0, 1]], p) * (1 + 1e-9)


def test_group_predictor_tracks_the_mean_square_and_plans_reads_from_it():
    p = GroupLengthPredictor(alpha=0.5, prior=100.0)
    assert p.predict_square(["a"]) is None  # nothing observed yet
    p.observe(["a"], [[10, 30]])
    p.observe(["a"], [[20, 20]])
    square = p.predict_square(["a"])
    assert square[0] == pytest.approx(0.5 * 400 + 0.5 * 500)
    # A group split into run-aways at the limit and short answers: the spread between the
    # mean and the longest under-counts its reads; the mean square does not.
    lengths = np.array([8000.0] * 4 + [100.0] * 12)
    prompt = np.array([200.0])
    mean, top = np.array([lengths.mean()]), np.array([8000.0])
    sq = np.array([(lengths ** 2).mean()])
    direct = planning_workload(mean, top, 16, prompt, mean_square=sq)
    spread = planning_workload(mean, top, 16, prompt)
    truth = context_tokens(200.0, lengths).sum()
    assert direct.ctx[0] == pytest.approx(truth, rel=0.01)
    assert spread.ctx[0] < 0.9 * truth
    # NaN (no square for that prompt) falls back to the spread.
    assert planning_workload(mean, top, 16, prompt, mean_square=[np.nan]).ctx[0] == \
        pytest.approx(spread.ctx[0])
    # A state saved before the mean square existed loads; its prompts read as NaN.
    state = p.state_dict()
    del state["square"]
    old = GroupLengthPredictor()
    old.load_state_dict(state)
    old.observe(["b"], [[5, 5]])
    sq = old.predict_square(["a", "b"])
    assert np.isnan(sq[0]) and sq[1] == pytest.approx(25.0)
