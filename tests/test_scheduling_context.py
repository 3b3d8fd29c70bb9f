"""The optional KV-read (context) term of the scheduler's time model."""

from __future__ import annotations

import numpy as np
import pytest

from rlhfless.scheduling.assign import assign_workload
from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.workmodel import (
    Workload,
    bin_time,
    context_tokens,
    lower_bound,
    makespan,
    simple_lower_bound,
    unit_times,
)

_P = Profile(tpot_base_s=0.01, tpot_per_seq_s=1e-4, prefill_tok_per_s=10_000.0)


def _ctx_loop(prompt: int, n: int) -> float:
    """Context read summed iteration by iteration (the closed form's reference)."""
    return float(sum(prompt + i for i in range(n)))


def test_context_defaults_to_zero_and_changes_nothing():
    lens, prompts = np.array([100.0, 800.0, 300.0]), np.array([50.0, 20.0, 10.0])
    plain = Workload.groups(lens, 4, prompts)
    assert np.all(plain.ctx == 0)
    with_ctx = Workload.groups(lens, 4, prompts, context=True)
    # k = 0 (the default): the context field is ignored.
    assert np.allclose(unit_times(plain, _P), unit_times(with_ctx, _P))
    assert Profile().tpot_per_ctx_s == 0.0
    assert Profile.from_dict(_P.to_dict()) == _P


def test_context_tokens_match_iteration_sum():
    for p, n in ((0, 10), (100, 1), (37, 250)):
        assert context_tokens(p, n) == pytest.approx(_ctx_loop(p, n), rel=0.01, abs=n)


def test_context_term_adds_k_times_ctx_to_a_bin():
    k = 2e-7
    prof = Profile(tpot_base_s=0.01, tpot_per_seq_s=1e-4, prefill_tok_per_s=10_000.0,
                   tpot_per_ctx_s=k)
    w = Workload.groups([100.0, 2000.0], 8, [30.0, 30.0], context=True)
    base = bin_time(Workload.groups([100.0, 2000.0], 8, [30.0, 30.0]), [0, 1], prof)
    expected_ctx = 8 * (context_tokens(30.0, 100.0) + context_tokens(30.0, 2000.0))
    assert bin_time(w, [0, 1], prof) == pytest.approx(base + k * expected_ctx)
    # long units grow quadratically: 20x the length -> far more than 20x the KV reads
    assert w.ctx[1] / w.ctx[0] > 200


def test_separate_lmax_sets_the_bin_length():
    w = Workload.groups([100.0, 100.0], 4, lmax=[400.0, 150.0])
    assert list(w.lmax) == [400.0, 150.0]
    assert list(w.tokens) == [400.0, 400.0]
    assert bin_time(w, [0, 1], _P) == pytest.approx(0.01 * 400 + 1e-4 * 800)


def test_negative_context_coefficient_rejected():
    with pytest.raises(ValueError):
        Profile(tpot_per_ctx_s=-1e-9)


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_lower_bounds_stay_below_makespan_with_context(batching):
    rng = np.random.default_rng(3)
    prof = Profile(tpot_base_s=0.01, tpot_per_seq_s=1e-4, prefill_tok_per_s=10_000.0,
                   tpot_per_ctx_s=1e-7, max_batch=64, batching=batching)
    lens = rng.lognormal(6.5, 1.0, 60).clip(10, 8000)
    w = Workload.groups(lens, 8, rng.integers(20, 300, 60), lmax=lens * 1.5, context=True)
    for n in (1, 3, 8):
        bins = assign_workload(w, n, prof, "length-aware", 0)
        ms = makespan(w, bins, prof)
        assert simple_lower_bound(w, n, prof) <= lower_bound(w, n, prof) * (1 + 1e-9)
        assert lower_bound(w, n, prof) <= ms * (1 + 1e-9)


def test_length_aware_balances_context_heavy_units():
    """With the context term, a bin of long sequences is known to be slow: the policy keeps
    fewer of them together than the affine law alone would."""
    prof_k = Profile(tpot_base_s=0.001, tpot_per_seq_s=1e-5, prefill_tok_per_s=1e6,
                     tpot_per_ctx_s=1e-6)
    prof_0 = Profile(tpot_base_s=0.001, tpot_per_seq_s=1e-5, prefill_tok_per_s=1e6)
    lens = np.array([4000.0] * 4 + [100.0] * 40)
    w = Workload.groups(lens, 4, context=True)
    bins_k = assign_workload(w, 4, prof_k, "length-aware", 0)
    bins_0 = assign_workload(w, 4, prof_0, "length-aware", 0)
    assert makespan(w, bins_k, prof_k) <= makespan(w, bins_0, prof_k) * (1 + 1e-9)
