"""Rule-based rewards and their registry."""

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfless.api.spec import RewardSpec
from rlhfless.rewards import (
    REWARDS,
    check_reward_args,
    compute_rewards,
    extract_answer,
    get_reward,
)

EM = REWARDS["exact_match"]


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("The total is 12. #### 42", "42", 1.0),  # #### wins over the last number
        ("#### 42 and later I said 7", "42", 1.0),
        ("so 3 + 4 = 7", "7", 1.0),  # no ####: last number
        ("#### 1,234", "1234", 1.0),  # thousands commas
        ("answer: 1234", "1,234", 1.0),
        ("#### 42.0", "42", 1.0),  # trailing .0
        ("#### 42.", "42", 1.0),  # sentence full stop
        ("#### $5", "5", 1.0),
        ("#### -3", "-3", 1.0),
        ("#### 41", "42", 0.0),
        ("no number here", "42", 0.0),
        ("", "42", 0.0),
        ("#### 42", "Natalia sold 48/2 = 24 clips... #### 42", 1.0),  # GSM8K full solution
        ("#### 42", 42, 1.0),  # numeric answer in meta
        ("#### 0.5", "0.50", 1.0),
    ],
)
def test_exact_match(response, answer, expected):
    assert EM("q", response, {"answer": answer}) == expected


def test_exact_match_scores_and_missing_answer():
    assert EM("q", "#### 41", {"answer": "42"}, format_score=0.1) == 0.1
    assert EM("q", "nothing", {"answer": "42"}, format_score=0.1) == 0.0
    assert EM("q", "#### 42", {}) == 0.0
    assert EM("q", "#### 42", {"answer": "42"}, score=2.0) == 2.0


def test_extract_answer():
    assert extract_answer("a 1 b 2,000.5 c") == 2000.5
    assert extract_answer("#### 7 #### 8") == 8.0
    assert extract_answer("nope") is None


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_rewards_are_total_on_any_text(text):
    for name in ("exact_match", "format", "length_penalty", "target_char"):
        value = REWARDS[name]("p", text, {"answer": "3"})
        assert isinstance(value, float) and value == value  # finite, not NaN


def test_format_reward():
    fmt = REWARDS["format"]
    assert fmt("q", "work... #### 12", {}) == 1.0
    assert fmt("q", "#### twelve", {}) == 0.0
    assert fmt("q", "<answer>3</answer>", {}, pattern=r"<answer>\d+</answer>") == 1.0
    assert fmt("q", "x <answer>3</answer>", {}, pattern=r"<answer>\d+</answer>",
               mode="fullmatch") == 0.0
    with pytest.raises(ValueError, match="mode"):
        fmt("q", "", {}, mode="prefix")


def test_length_penalty():
    lp = REWARDS["length_penalty"]
    assert lp("q", "x" * 10, {}, target=10) == 0.0
    assert lp("q", "x" * 15, {}, target=10) == pytest.approx(-0.5)
    assert lp("q", "x" * 100, {}, target=10) == -1.0  # saturates at max_penalty
    assert lp("q", "x" * 12, {}, target=10, window=4, max_penalty=2.0) == pytest.approx(-1.0)


def test_target_char():
    tc = REWARDS["target_char"]
    assert tc("q", "aaba", {}, char="a") == 0.75
    assert tc("q", "", {}, char="a") == 0.0
    with pytest.raises(ValueError):
        tc("q", "a", {}, char="ab")


def test_combined_weighted_sum_both_spellings():
    meta = {"answer": "4"}
    resp = "#### 4" + "x" * 14  # 20 chars
    by_weights = REWARDS["combined"](
        "q", resp, meta, weights={"exact_match": 1.0, "length_penalty": 0.5},
        args={"length_penalty": {"target": 10}},
    )
    by_components = REWARDS["combined"](
        "q", resp, meta,
        components=[{"name": "exact_match", "weight": 1.0},
                    {"name": "length_penalty", "weight": 0.5, "args": {"target": 10}}],
    )
    assert by_weights == pytest.approx(1.0 - 0.5 * 1.0)
    assert by_components == pytest.approx(by_weights)


def test_compute_rewards_with_spec_and_namespace():
    spec = RewardSpec(name="exact_match")
    out = compute_rewards(spec, ["a", "b"], ["#### 3", "#### 4"], [{"answer": "3"}, {"answer": 3}])
    assert out == [1.0, 0.0]
    ns = SimpleNamespace(name="target_char", args={"char": "z"})
    assert compute_rewards(ns, ["p"], ["zz"], None) == [1.0]


def test_unknown_reward_and_bad_args_are_clear():
    with pytest.raises(ValueError,
                       match="unknown reward 'bleu'; known: code_tests, combined, exact_match"):
        compute_rewards(SimpleNamespace(name="bleu", args={}), ["p"], ["r"], None)
    with pytest.raises(ValueError, match="unknown args: chr; accepts: char"):
        compute_rewards(SimpleNamespace(name="target_char", args={"chr": "a"}), ["p"], ["r"])
    bad_inner = SimpleNamespace(name="combined", args={"weights": {"nope": 1.0}})
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        compute_rewards(bad_inner, ["p"], ["r"])
    with pytest.raises(ValueError, match="responses"):
        compute_rewards(SimpleNamespace(name="format", args={}), ["p", "q"], ["r"])
    assert get_reward("format") is REWARDS["format"]


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("format", {"pattern": "(unclosed"}, "invalid pattern"),
        ("target_char", {"char": 5}, "reward 'target_char': bad args"),
        ("target_char", {"char": "ab"}, "one character"),
        ("length_penalty", {"target": -1}, "target must be >= 0"),
        ("combined", {"weights": {"format": 1.0}, "args": {"format": {"mode": "x"}}}, "mode"),
        ("combined", {"weights": {"combined": 1.0}}, "cannot itself be 'combined'"),
        ("combined", {}, "give 'components'"),
    ],
)
def test_bad_arg_values_fail_at_spec_validation(name, args, message):
    with pytest.raises(ValueError, match=message):
        check_reward_args(name, args)
    with pytest.raises(ValueError, match=message):  # the job spec reports it at the edge
        RewardSpec(name=name, args=args)
