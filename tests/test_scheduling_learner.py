"""The streaming step's policies: the learner plan, the hand-off estimate, the step plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhfless.scheduling.assign import assign_workload
from rlhfless.scheduling.handoff import handoff_estimate
from rlhfless.scheduling.learner import (
    ArrivalCurve,
    LearnerProfile,
    earliest_free,
    free_gpu_curve,
    learner_queue,
    learner_start,
    plan_learner,
)
from rlhfless.scheduling.planning import planning_workload
from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.scaling import TIME_SLACK
from rlhfless.scheduling.step import candidate_counts, plan_step
from rlhfless.scheduling.workmodel import unit_finish_times

PROF = Profile(tpot_base_s=0.008, tpot_per_seq_s=2e-5, prefill_tok_per_s=30_000.0,
               tpot_per_ctx_s=2e-8, cold_start_s=11.0, keep_alive_s=1.0, max_batch=256,
               kv_tokens=1e6)
LEARNER = LearnerProfile(gpu_s_per_token=2e-3, init_s=10.0, load_gpu_s=40.0, finish_s=2.0,
                         min_gpus=4, max_gpus=64, gpu_step=4)


def _queue_by_hand(arrivals, work, gpus, ready):
    t = ready
    for k in np.argsort(arrivals, kind="stable"):
        t = max(t, arrivals[k]) + work[k] / gpus
    return t


def test_learner_queue_is_fifo_and_its_busy_time_is_the_work():
    rng = np.random.default_rng(1)
    a, w = rng.uniform(0, 100, 30), rng.uniform(1, 20, 30)
    end, busy = learner_queue(a, w, 4, 10.0)
    assert end == pytest.approx(_queue_by_hand(a, w, 4, 10.0))
    assert sum(e - s for s, e in busy) == pytest.approx(w.sum() / 4)
    assert all(b[1] <= c[0] for b, c in zip(busy, busy[1:], strict=False))  # merged, ordered
    assert learner_queue([], [], 2, 5.0) == (5.0, [])


def test_just_in_time_start_loses_no_time_and_costs_less():
    rng = np.random.default_rng(2)
    arrivals = np.sort(rng.uniform(20, 200, 64))
    tokens = rng.uniform(5e3, 5e4, 64)
    plan = plan_learner(arrivals, tokens, LEARNER, lam=0.5)
    work = tokens * LEARNER.gpu_s_per_token
    early, _ = learner_queue(arrivals, work, plan.gpus, LEARNER.cold_start_s(plan.gpus))
    late, _ = learner_queue(arrivals, work, plan.gpus, plan.ready_s)
    assert late == pytest.approx(early, rel=1e-9)  # starting later costs no time ...
    assert plan.start_s > 0  # ... and the plan does start later (cheaper)
    assert plan.end_s == pytest.approx(late + LEARNER.finish_s)
    assert plan.gpus % LEARNER.gpu_step == 0 and plan.gpus >= LEARNER.min_gpus
    fast = plan_learner(arrivals, tokens, LEARNER, lam=1.0)
    cheap = plan_learner(arrivals, tokens, LEARNER, lam=0.0)
    assert fast.end_s <= plan.end_s <= cheap.end_s + 1e-9
    assert cheap.gpu_seconds <= plan.gpu_seconds <= fast.gpu_seconds + 1e-9


def test_quota_delays_the_learner_until_its_gpus_are_free():
    curve = free_gpu_curve([50.0, 80.0, 120.0], gpus_per_actor=8, quota=32)
    assert curve[0] == (0.0, 8)
    assert earliest_free(curve, 8) == 0.0
    assert earliest_free(curve, 16) == 50.0 and earliest_free(curve, 32) == 120.0
    assert earliest_free(curve, 40) == float("inf")
    arrivals, tokens = np.linspace(10, 150, 40), np.full(40, 2e4)
    plan = plan_learner(arrivals, tokens, LEARNER, free_gpus=curve)
    assert plan.start_s >= earliest_free(curve, plan.gpus) - 1e-9
    assert plan.gpus <= 32
    with pytest.raises(ValueError, match="fits"):
        plan_learner(arrivals, tokens, LEARNER, free_gpus=[(0.0, 2)])


def test_learner_start_follows_the_corrected_end_and_early_work():
    arrivals, tokens = np.linspace(10, 150, 40), np.full(40, 2e4)
    plan = plan_learner(arrivals, tokens, LEARNER)
    assert plan.start_at(plan.end_s) == pytest.approx(plan.start_s)
    assert plan.start_at(plan.end_s + 30) == pytest.approx(plan.start_s + 30)  # slower rollout
    assert learner_start(plan, plan.end_s + 30) == pytest.approx(plan.start_s + 30)
    # work in at t=1 that alone keeps the learner busy until the end: start at once
    busy_until_end = (plan.end_s + 30) * plan.gpus / plan.gpu_s_per_token
    assert learner_start(plan, plan.end_s + 30, [1.0], [busy_until_end]) == 1.0
    assert learner_start(plan, plan.end_s + 30, [1.0], [0.1 * busy_until_end]) == \
        pytest.approx(plan.start_s + 30)


def test_arrival_curve_learns_a_shape_and_spreads_the_work():
    curve = ArrivalCurve(points=10, alpha=1.0)
    assert not curve.known
    curve.observe([10.0, 50.0, 90.0, 100.0], [1.0, 1.0, 1.0, 1.0], rollout_s=100.0)
    times, work = curve.expected(400.0, 200.0)
    assert len(times) == 10 and times[-1] == pytest.approx(200.0)
    assert work.sum() == pytest.approx(400.0) and np.all(work >= 0)
    assert work[:5].sum() == pytest.approx(200.0)  # half the work came in the first half
    back = ArrivalCurve()
    back.load_state_dict(json.loads(json.dumps(curve.state_dict())))
    assert np.allclose(back.expected(4.0, 1.0)[1], curve.expected(4.0, 1.0)[1])
    with pytest.raises(ValueError):
        ArrivalCurve().expected(1.0, 1.0)


def _work(n: int = 48, seed: int = 0):
    rng = np.random.default_rng(seed)
    mean = rng.lognormal(7.0, 0.6, n).clip(50, 6000)
    top = np.minimum(mean * rng.uniform(1.3, 3.0, n), 16_000)
    return planning_workload(mean, top, 8, rng.integers(50, 300, n))


def test_handoff_estimate_without_a_cut_is_the_time_model():
    work = _work()
    bins = assign_workload(work, 6, PROF, "length-aware")
    est = handoff_estimate(work, bins, PROF, 1.0)
    assert np.allclose(est.finish, unit_finish_times(work, bins, PROF))
    assert np.all(est.receiver == -1)


def test_handoff_estimate_releases_cut_actors_and_loads_receivers():
    work = _work()
    bins = assign_workload(work, 6, PROF, "length-aware")
    plain = handoff_estimate(work, bins, PROF, 1.0)
    cut = handoff_estimate(work, bins, PROF, 0.5)
    gave = np.flatnonzero(cut.receiver >= 0)
    assert len(gave) > 0
    for b in gave:
        assert cut.ends[b] < plain.ends[b]  # released at its cut, before its own end
        assert cut.receiver[b] != b and cut.receiver[cut.receiver[b]] == -1  # moved once
    receivers = set(cut.receiver[gave])
    assert any(cut.ends[r] > plain.ends[r] for r in receivers)  # receivers carry the tails
    assert cut.makespan >= plain.makespan * 0.999


def test_plan_step_shares_the_quota_and_follows_lambda():
    work = _work(64, seed=3)
    tokens = work.tokens + work.prefill
    common = dict(max_actors=16, quota=24, handoff_tau=0.7, margin_s=2.0)
    plan = plan_step(work, tokens, PROF, LEARNER, lam=0.5, **common)
    assert plan.n == len(plan.bins) and 1 <= plan.n <= 16
    assert sorted(i for b in plan.bins for i in b) == list(range(len(work)))
    row = next(r for r in plan.table if r.n == plan.n)
    assert row.learner_gpus == plan.learner.gpus <= 24
    fast = plan_step(work, tokens, PROF, LEARNER, lam=1.0, time_slack=None, **common)
    cheap = plan_step(work, tokens, PROF, LEARNER, lam=0.0, time_slack=None, **common)
    assert min(r.time_s for r in fast.table) == pytest.approx(
        next(r.time_s for r in fast.table if r.n == fast.n))
    assert min(r.gpu_seconds for r in cheap.table) == pytest.approx(
        next(r.gpu_seconds for r in cheap.table if r.n == cheap.n))
    # By default λ trades only among plans within TIME_SLACK of the fastest.
    slack = plan_step(work, tokens, PROF, LEARNER, lam=0.0, **common)
    chosen = next(r for r in slack.table if r.n == slack.n)
    fastest = min(r.time_s for r in slack.table)
    assert chosen.time_s <= fastest * (1 + TIME_SLACK) + 1e-9
    assert chosen.gpu_seconds == pytest.approx(min(
        r.gpu_seconds for r in slack.table if r.time_s <= fastest * (1 + TIME_SLACK) + 1e-9))
    fixed = plan_step(work, tokens, PROF, LEARNER, lam=0.5, candidates=[5], **common)
    assert fixed.n == 5 and len(fixed.table) == 1
    slower = plan_step(work, tokens, PROF, LEARNER, lam=0.5, candidates=[5],
                       rollout_scale=1.5, **common)
    assert slower.learner.end_s > fixed.learner.end_s


def test_candidate_counts_cover_the_range():
    grid = candidate_counts(160)
    assert grid[0] == 1 and grid[-1] == 160 and grid == sorted(set(grid))
    assert candidate_counts(3, 3) == [3]
    with pytest.raises(ValueError):
        candidate_counts(2, 3)
