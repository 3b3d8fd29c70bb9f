"""Length predictor: EWMA math, fallback quantile, state round-trip, Spearman."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfless.scheduling.predictor import (
    LengthPredictor,
    prediction_error,
    rank_average,
    spearman,
)


def test_ewma_matches_hand_computation():
    p = LengthPredictor(alpha=0.25)
    p.update(["a"], [100])
    assert p.predict(["a"])[0] == 100  # first observation is taken as is
    p.update(["a"], [200])
    assert p.predict(["a"])[0] == pytest.approx(0.25 * 200 + 0.75 * 100)
    p.update(["a"], [40])
    assert p.predict(["a"])[0] == pytest.approx(0.25 * 40 + 0.75 * 125)
    assert p.observations("a") == 3


@given(st.floats(0.01, 1.0), st.lists(st.floats(0, 1e4), min_size=1, max_size=12))
def test_ewma_closed_form(alpha, xs):
    """pred = (1-α)^(n-1)·x0 + Σ_{i≥1} α(1-α)^(n-1-i)·x_i."""
    p = LengthPredictor(alpha=alpha)
    for x in xs:
        p.update([7], [x])
    n = len(xs)
    expected = (1 - alpha) ** (n - 1) * xs[0] + sum(
        alpha * (1 - alpha) ** (n - 1 - i) * xs[i] for i in range(1, n))
    assert p.predict([7])[0] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_repeated_id_in_one_update_is_one_epoch_of_its_mean():
    p = LengthPredictor(alpha=0.5)
    p.update(["a", "a", "b"], [10, 30, 5])
    assert p.predict(["a"])[0] == 20
    assert p.observations("a") == 1


def test_unseen_prompts_get_prior_then_running_quantile():
    p = LengthPredictor(alpha=0.5, default_quantile=0.9, window=5, prior=123.0)
    assert p.predict(["new"])[0] == 123.0
    p.update([f"id{i}" for i in range(10)], list(range(10)))  # window keeps 5..9
    expected = float(np.quantile([5, 6, 7, 8, 9], 0.9))
    assert p.default() == pytest.approx(expected)
    out = p.predict(["id2", "unseen", "other"])
    assert out[0] == 2 and out[1] == pytest.approx(expected) and out[2] == out[1]
    assert p.known(["id2", "unseen"]).tolist() == [True, False]


def test_int_and_str_ids_are_the_same_prompt():
    p = LengthPredictor()
    p.update([7], [50])
    assert "7" in p and p.predict(["7"])[0] == 50


def test_state_dict_json_round_trip_keeps_predictions():
    p = LengthPredictor(alpha=0.3, default_quantile=0.75, window=16, prior=64)
    rng = np.random.default_rng(0)
    for _ in range(4):
        ids = rng.integers(0, 40, 25).tolist()
        p.update(ids, rng.integers(1, 900, 25))
    state = json.loads(json.dumps(p.state_dict()))
    q = LengthPredictor.from_state_dict(state)
    probe = list(range(50))
    np.testing.assert_array_equal(p.predict(probe), q.predict(probe))
    # And both evolve identically afterwards.
    p.update([3, 99], [10, 20])
    q.update([3, 99], [10, 20])
    np.testing.assert_array_equal(p.predict(probe + [99]), q.predict(probe + [99]))
    assert q.alpha == 0.3 and q.window == 16


@pytest.mark.parametrize("kwargs", [{"alpha": 0}, {"alpha": 1.5}, {"default_quantile": 2},
                                    {"window": 0}, {"prior": -1}])
def test_bad_hyper_parameters_rejected(kwargs):
    with pytest.raises(ValueError):
        LengthPredictor(**kwargs)


def test_bad_lengths_rejected():
    p = LengthPredictor()
    with pytest.raises(ValueError):
        p.update(["a"], [-1])
    with pytest.raises(ValueError):
        p.update(["a", "b"], [1])


# ---------------------------------------------------------------- error metrics


def _naive_spearman(x, y):
    def ranks(v):
        return [sum(w < u for w in v) + (sum(w == u for w in v) + 1) / 2 for u in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den


def test_rank_average_with_ties():
    assert rank_average(np.array([10.0, 20, 10, 30])).tolist() == [1.5, 3, 1.5, 4]


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=3, max_size=25))
def test_spearman_matches_naive_definition(pairs):
    x = [a for a, _ in pairs]
    y = [b for _, b in pairs]
    if len(set(x)) < 2 or len(set(y)) < 2:
        assert math.isnan(spearman(x, y))
    else:
        assert spearman(x, y) == pytest.approx(_naive_spearman(x, y), abs=1e-12)


def test_spearman_monotone_and_reversed():
    x = np.arange(20.0)
    assert spearman(x, np.exp(x / 3)) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)


def test_prediction_error():
    err = prediction_error([10, 20, 30], [12, 18, 33])
    assert err["mae"] == pytest.approx((2 + 2 + 3) / 3)
    assert err["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        prediction_error([1, 2], [1])
