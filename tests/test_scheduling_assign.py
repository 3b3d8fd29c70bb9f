"""Assignment: groups whole and assigned once, the time model, bounds against brute force."""

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfless.scheduling.assign import POLICIES, assign, assign_workload
from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.workmodel import (
    Workload,
    bin_time,
    lower_bound,
    makespan,
    simple_lower_bound,
)


def ref_bin_time(lengths, prompts, group_size, p: Profile) -> float:
    """The documented formula, written out per sequence (independent of the vectorised code)."""
    if not lengths:
        return 0.0
    prefill = sum(prompts) / p.prefill_tok_per_s
    seqs = [ell for ell in lengths for _ in range(group_size)]
    if p.batching == "static":
        return prefill + max(seqs) * (p.tpot_base_s + p.tpot_per_seq_s * len(seqs))
    iterations = max(seqs)
    if p.max_batch is not None:
        iterations = max(iterations, sum(seqs) / p.max_batch)
    return prefill + p.tpot_base_s * iterations + p.tpot_per_seq_s * sum(seqs)


profiles = st.builds(
    Profile,
    tpot_base_s=st.floats(1e-4, 0.05),
    tpot_per_seq_s=st.floats(0.0, 2e-3),
    prefill_tok_per_s=st.floats(100.0, 1e5),
    max_batch=st.one_of(st.none(), st.integers(1, 64)),
    batching=st.sampled_from(["continuous", "static"]),
)


def _check_partition(bins, m, n):
    assert len(bins) == n
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(m))  # every group exactly once, never split
    if m >= n:
        assert all(bins)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 4000), min_size=0, max_size=60),
    n=st.integers(1, 12),
    g=st.integers(1, 8),
    profile=profiles,
    policy=st.sampled_from(POLICIES),
    seed=st.integers(0, 5),
)
def test_every_group_once_in_n_bins(lengths, n, g, profile, policy, seed):
    bins = assign(lengths, n, profile, group_size=g, policy=policy, seed=seed)
    _check_partition(bins, len(lengths), n)


def test_bin_time_hand_computed():
    p = Profile(tpot_base_s=0.01, tpot_per_seq_s=0.001, prefill_tok_per_s=1000)
    work = Workload.groups([100, 40], 4, prompt_tokens=[500, 300])
    # continuous, no cap: prefill 0.8 s + a·100 + c·(4·100 + 4·40)
    assert bin_time(work, [0, 1], p) == pytest.approx(0.8 + 1.0 + 0.56)
    capped = Profile(tpot_base_s=0.01, tpot_per_seq_s=0.001, prefill_tok_per_s=1000,
                     max_batch=2)
    # 560 tokens on 2 slots need ≥ 280 iterations > longest 100
    assert bin_time(work, [0, 1], capped) == pytest.approx(0.8 + 2.8 + 0.56)
    static = Profile(tpot_base_s=0.01, tpot_per_seq_s=0.001, prefill_tok_per_s=1000,
                     batching="static")
    # one batch of 8 sequences until the longest (100) ends: 100 × tpot(8)
    assert bin_time(work, [0, 1], static) == pytest.approx(0.8 + 100 * (0.01 + 0.008))
    assert bin_time(work, [], p) == 0.0


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 3000), min_size=1, max_size=12),
    prompts=st.data(),
    g=st.integers(1, 6),
    profile=profiles,
)
def test_bin_time_matches_reference(lengths, prompts, g, profile):
    pt = prompts.draw(st.lists(st.integers(0, 800), min_size=len(lengths),
                               max_size=len(lengths)))
    work = Workload.groups(lengths, g, pt)
    idx = list(range(len(lengths)))
    assert bin_time(work, idx, profile) == pytest.approx(
        ref_bin_time(lengths, pt, g, profile), rel=1e-9, abs=1e-12)


def _brute_force_optimum(work: Workload, n: int, profile: Profile) -> float:
    best = float("inf")
    m = len(work)
    for labels in itertools.product(range(n), repeat=m):
        if labels and labels[0] != 0:  # bins are interchangeable
            continue
        bins = [[i for i in range(m) if labels[i] == b] for b in range(n)]
        best = min(best, makespan(work, bins, profile))
    return best


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 2000), min_size=1, max_size=7),
    prompt=st.data(),
    n=st.integers(1, 3),
    g=st.integers(1, 4),
    profile=profiles,
)
def test_lower_bounds_never_exceed_the_brute_force_optimum(lengths, prompt, n, g, profile):
    pt = prompt.draw(st.lists(st.integers(0, 600), min_size=len(lengths),
                              max_size=len(lengths)))
    work = Workload.groups(lengths, g, pt)
    opt = _brute_force_optimum(work, n, profile)
    lb = lower_bound(work, n, profile)
    assert simple_lower_bound(work, n, profile) <= lb * (1 + 1e-9) + 1e-12
    assert lb <= opt * (1 + 1e-9) + 1e-12
    la = makespan(work, assign(work, n, profile), profile)
    assert la >= opt * (1 - 1e-9)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 2000), min_size=1, max_size=7),
    prompt_tokens=st.integers(0, 600),
    n=st.integers(1, 3),
    g=st.integers(1, 4),
    profile=profiles,
)
def test_length_aware_is_optimal_for_static_batching_with_equal_prompts(
        lengths, prompt_tokens, n, g, profile):
    """Equal prompts, static batching: some optimal split is contiguous by length."""
    profile = Profile(**{**profile.to_dict(), "batching": "static"})
    work = Workload.groups(lengths, g, [prompt_tokens] * len(lengths))
    opt = _brute_force_optimum(work, n, profile)
    la = makespan(work, assign(work, n, profile), profile)
    assert la <= opt * (1 + 2e-4) + 1e-12  # bisection tolerance
    assert lower_bound(work, n, profile) >= opt * (1 - 2e-6)


def test_length_aware_sorts_similar_lengths_together():
    rng = np.random.default_rng(3)
    lengths = rng.lognormal(5, 1, 200)
    bins = assign(lengths, 4, Profile(), group_size=8)
    maxima = [lengths[b].max() for b in bins]
    minima = [lengths[b].min() for b in bins]
    assert maxima == sorted(maxima, reverse=True)
    for k in range(3):  # contiguous: every group of bin k is at least as long as bin k+1's
        assert minima[k] >= maxima[k + 1]
    for b in bins:  # longest first inside a bin
        assert list(lengths[b]) == sorted(lengths[b], reverse=True)


def test_round_robin_and_random_deal_equal_counts():
    rr = assign([5] * 10, 3, Profile(), policy="round-robin")
    assert rr == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    r1 = assign(list(range(10)), 3, Profile(), policy="random", seed=1)
    assert r1 == assign(list(range(10)), 3, Profile(), policy="random", seed=1)
    assert sorted(len(b) for b in r1) == [3, 3, 4]


@pytest.mark.parametrize("batching,max_batch", [("continuous", None), ("continuous", 512),
                                                ("static", None)])
def test_long_tail_length_aware_beats_round_robin_near_bound(batching, max_batch):
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(400), 1.0, 1024), 16, 8192).round()
    p = Profile(batching=batching, max_batch=max_batch)
    work = Workload.groups(lengths, 8, rng.integers(50, 300, 1024))
    la = makespan(work, assign_workload(work, 8, p), p)
    rr = makespan(work, assign_workload(work, 8, p, "round-robin"), p)
    lb = lower_bound(work, 8, p)
    assert lb <= la <= 1.05 * lb
    assert rr > 1.05 * la


def test_decides_4096_groups_quickly():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(400), 1.0, 4096), 16, 8192)
    assign(lengths, 8, Profile(), group_size=8)  # warm-up
    started = time.perf_counter()
    bins = assign(lengths, 8, Profile(), group_size=8)
    elapsed = time.perf_counter() - started
    _check_partition(bins, 4096, 8)
    # The goal is ≤ 30 ms (see benchmarks/scheduling.py); leave room for a busy CI machine.
    assert elapsed < 0.3


def test_more_bins_than_groups_leaves_empty_bins():
    bins = assign([10, 20], 4, Profile(), group_size=2)
    _check_partition(bins, 2, 4)
    assert sum(1 for b in bins if b) == 2


def test_invalid_arguments():
    with pytest.raises(ValueError):
        assign([1, 2], 0, Profile())
    with pytest.raises(ValueError):
        assign([1, 2], 2, Profile(), policy="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        assign([-1.0], 1, Profile())
