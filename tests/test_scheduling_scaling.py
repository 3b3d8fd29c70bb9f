"""Cost-aware actor scaling and cut-and-migrate planning."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfless.scheduling.assign import assign
from rlhfless.scheduling.cost import planned_gpu_seconds
from rlhfless.scheduling.migrate import (
    cut_threshold,
    plan_migration,
    remaining_estimate,
    should_cut,
)
from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.scaling import choose_actor_count, step_time
from rlhfless.scheduling.workmodel import Workload, bin_times, makespan

lengths_st = st.lists(st.integers(1, 4000), min_size=1, max_size=80)
profiles = st.builds(
    Profile,
    tpot_base_s=st.floats(1e-4, 0.05),
    tpot_per_seq_s=st.floats(0.0, 1e-3),
    cold_start_s=st.floats(0.0, 120.0),
    keep_alive_s=st.floats(0.0, 120.0),
    gpus_per_actor=st.integers(1, 8),
    max_batch=st.one_of(st.none(), st.integers(1, 256)),
    batching=st.sampled_from(["continuous", "static"]),
)


def test_step_time_and_planned_cost_formulas():
    p = Profile(cold_start_s=10, keep_alive_s=5, gpus_per_actor=2)
    times = [30.0, 20.0, 0.0]  # the empty bin launches no actor
    assert step_time(times, p, warm=0) == 40.0
    assert step_time(times, p, warm=1) == max(30.0, 10 + 20.0)
    assert step_time(times, p, warm=2) == 30.0
    assert planned_gpu_seconds(times, p, warm=0) == 2 * (50 + 2 * 5 + 2 * 10)
    assert planned_gpu_seconds(times, p, warm=1) == 2 * (50 + 2 * 5 + 1 * 10)
    assert planned_gpu_seconds(times, p, warm=5) == 2 * (50 + 2 * 5)


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, g=st.integers(1, 8), profile=profiles,
       lam=st.floats(0.0, 1.0), max_actors=st.integers(1, 10), min_actors=st.integers(1, 3),
       warm=st.integers(0, 4))
def test_decision_within_bounds_and_table_consistent(lengths, g, profile, lam, max_actors,
                                                     min_actors, warm):
    min_actors = min(min_actors, max_actors)
    d = choose_actor_count(lengths, g, profile, lam, max_actors, min_actors=min_actors,
                           warm=warm)
    upper = max(min_actors, min(max_actors, len(lengths)))
    assert [r.n for r in d.table] == list(range(min_actors, upper + 1))
    assert min_actors <= d.n <= max_actors
    assert len(d.bins) == d.n
    assert sorted(i for b in d.bins for i in b) == list(range(len(lengths)))
    work = Workload.groups(lengths, g)
    row = next(r for r in d.table if r.n == d.n)
    # The table's T and C are those of the returned assignment.
    t = bin_times(work, d.bins, profile)
    assert row.time_s == pytest.approx(step_time(t, profile, warm), rel=1e-9)
    assert row.gpu_seconds == pytest.approx(planned_gpu_seconds(t, profile, warm), rel=1e-9)
    for r in d.table:
        assert r.score == pytest.approx(lam * r.time_s / d.t_ref
                                        + (1 - lam) * r.gpu_seconds / d.c_ref)
        assert r.score >= row.score - 1e-12
    assert d.t_ref == pytest.approx(min(r.time_s for r in d.table))
    assert d.c_ref == pytest.approx(min(r.gpu_seconds for r in d.table))


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, g=st.integers(1, 8), profile=profiles,
       max_actors=st.integers(1, 10))
def test_lambda_extremes_pick_fastest_and_cheapest(lengths, g, profile, max_actors):
    fast = choose_actor_count(lengths, g, profile, 1.0, max_actors)
    cheap = choose_actor_count(lengths, g, profile, 0.0, max_actors)
    times = [r.time_s for r in fast.table]
    costs = [r.gpu_seconds for r in cheap.table]
    # Ties (equal up to rounding) may go to either count: compare the values.
    assert next(r.time_s for r in fast.table if r.n == fast.n) == pytest.approx(min(times))
    assert next(r.gpu_seconds for r in cheap.table if r.n == cheap.n) == pytest.approx(
        min(costs))


@settings(max_examples=20, deadline=None)
@given(lengths=lengths_st, g=st.integers(1, 8), profile=profiles,
       max_actors=st.integers(2, 8))
def test_more_weight_on_time_never_picks_a_slower_plan(lengths, g, profile, max_actors):
    picked = []
    for lam in np.linspace(0, 1, 6):
        d = choose_actor_count(lengths, g, profile, float(lam), max_actors)
        row = next(r for r in d.table if r.n == d.n)
        picked.append((row.time_s, row.gpu_seconds))
    for (t0, c0), (t1, c1) in zip(picked, picked[1:], strict=False):
        assert t1 <= t0 * (1 + 1e-9) and c1 >= c0 * (1 - 1e-9)


def test_long_tail_tradeoff_spans_the_range():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(400), 1.0, 1024), 16, 8192)
    p = Profile()
    decisions = [choose_actor_count(lengths, 8, p, lam, 16) for lam in (0.0, 0.5, 1.0)]
    picks = [d.n for d in decisions]
    assert picks[0] == 1 and 1 < picks[1] < picks[2]
    # λ = 1: the smallest N reaching the best time (beyond it the longest group dominates).
    t = {r.n: r.time_s for r in decisions[2].table}
    assert t[picks[2]] < t[picks[2] - 1]
    assert all(t[n] >= t[picks[2]] for n in t)


def test_warm_actors_skip_cold_start():
    p = Profile(cold_start_s=100.0)
    cold = choose_actor_count([500] * 16, 8, p, 1.0, 4, warm=0)
    warm = choose_actor_count([500] * 16, 8, p, 1.0, 4, warm=4)
    assert cold.table[3].time_s == pytest.approx(warm.table[3].time_s + 100.0)


def test_invalid_scaling_arguments():
    with pytest.raises(ValueError):
        choose_actor_count([1], 1, Profile(), 1.5, 4)
    with pytest.raises(ValueError):
        choose_actor_count([1], 1, Profile(), 0.5, 0)
    with pytest.raises(ValueError):
        choose_actor_count([], 1, Profile(), 0.5, 4)


# ---------------------------------------------------------------- cut-and-migrate


@pytest.mark.parametrize("done,total,tau,expected", [
    (6, 10, 0.7, False), (7, 10, 0.7, True), (9, 10, 0.7, True), (10, 10, 0.7, False),
    (0, 0, 0.7, False), (9, 10, 1.0, False), (1, 3, 0.3, True), (0, 3, 0.3, False),
])
def test_should_cut(done, total, tau, expected):
    assert should_cut(done, total, tau) is expected


def test_cut_threshold_rounds_up_without_float_noise():
    assert cut_threshold(10, 0.7) == 7  # 0.7 * 10 = 7.000000000000001 in floating point
    assert cut_threshold(8, 0.7) == 6
    assert cut_threshold(1, 0.01) == 1
    with pytest.raises(ValueError):
        cut_threshold(10, 0.0)


def test_remaining_estimate():
    est = remaining_estimate([100, 100, 100, 50], [30, 120, 95, 10], max_new_tokens=128)
    assert est.tolist() == [70, 8, 23.75, 40]  # under, over budget, overrun, under
    assert np.all(est >= 1)


@settings(max_examples=50, deadline=None)
@given(
    remaining=st.lists(st.integers(1, 3000), min_size=0, max_size=60),
    n_from=st.integers(1, 12),
    lam=st.floats(0, 1),
    keyed=st.booleans(),
    profile=profiles,
)
def test_migration_conserves_items_and_shrinks(remaining, n_from, lam, keyed, profile):
    keys = [f"p{i % 7}" for i in range(len(remaining))] if keyed else None
    plan = plan_migration(remaining, n_from, profile, lam=lam, keys=keys,
                          prefill_tokens=[100] * len(remaining))
    assert sorted(i for b in plan.bins for i in b) == list(range(len(remaining)))
    if not remaining:
        assert plan.n_targets == 0 and plan.bins == []
        return
    assert 1 <= plan.n_targets <= max(1, n_from - 1)
    assert plan.n_targets < n_from or n_from == 1
    assert len(plan.bins) == plan.n_targets and all(plan.bins)
    if keys is not None:
        home = {}
        for b, items in enumerate(plan.bins):
            for i in items:
                assert home.setdefault(keys[i], b) == b  # one prompt's samples stay together


def test_migration_lambda_extremes():
    rng = np.random.default_rng(2)
    remaining = rng.integers(50, 3000, 200)
    p = Profile(keep_alive_s=5.0)
    fast = plan_migration(remaining, 8, p, lam=1.0)
    cheap = plan_migration(remaining, 8, p, lam=0.0)
    assert fast.n_targets == 7 and cheap.n_targets == 1
    # The chosen split is the length-aware one for that many actors.
    work = Workload(lmax=remaining.astype(float), tokens=remaining.astype(float),
                    seqs=np.ones(200), prefill=np.zeros(200))
    assert makespan(work, fast.bins, p) == pytest.approx(
        makespan(work, assign(work, 7, p), p))
