"""[math] (math-verify in bounded worker processes) and [multiple_choice] rewards."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlhfless.api.spec import RewardSpec, SpecError, parse_spec
from rlhfless.rewards import REWARDS, compute_rewards
from rlhfless.rewards.choice import extract_choice
from rlhfless.rewards.mathverify import boxed_gold, math_pool
from rlhfless.rewards.workers import WorkerPool, WorkerStartError

MATH = REWARDS["math"]


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5", 1.0),  # fraction vs decimal
        ("So x = 0.5", "\\frac{1}{2}", 1.0),
        ("\\boxed{3/4}", "$\\frac{3}{4}$", 1.0),  # $-wrapped gold
        ("The length is \\boxed{10\\text{ cm}}", "10", 1.0),  # units stripped
        ("\\boxed{10 \\mathrm{cm}}", "10", 1.0),
        ("She has 72 clips in total. #### 72", "72", 1.0),  # GSM8K style
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),  # symbolic equivalence
        ("The answer is 8", "7", 0.0),
        ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
        ("no idea", "42", 0.0),
        ("", "42", 0.0),
        ("#### 42", "", 0.0),  # nothing to compare with
    ],
)
def test_math_equivalence(response, answer, expected):
    assert MATH("q", response, {"answer": answer}) == expected


def test_math_gold_is_boxed_once():
    assert boxed_gold(" $\\frac{1}{2}$ ") == "\\boxed{\\frac{1}{2}}"
    assert boxed_gold("\\boxed{3}") == "\\boxed{3}"
    assert boxed_gold(42) == "\\boxed{42}"


def test_math_runs_from_worker_threads_and_each_call_is_bounded():
    # Reward functions run in worker threads, where signal-based timeouts cannot work.
    cases = [("\\boxed{0.5}", "\\frac{1}{2}", 1.0), ("#### 7", "7", 1.0), ("8", "7", 0.0)] * 4
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda c: MATH("q", c[0], {"answer": c[1]}), cases))
    assert out == [c[2] for c in cases]
    assert threading.current_thread() is threading.main_thread()  # calls ran elsewhere
    restarts = math_pool().restarts
    # A deadline too short for any comparison: 0, and the stuck worker is replaced ...
    assert MATH("q", "\\boxed{0.5}", {"answer": "1/2"}, timeout_s=1e-6) == 0.0
    assert math_pool().restarts == restarts + 1
    # ... so the next call gets a healthy one.
    assert MATH("q", "\\boxed{0.5}", {"answer": "1/2"}) == 1.0


def test_worker_pool_kills_a_hung_worker_within_its_deadline(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        "import json, sys, time\n"
        "print(json.dumps({'ready': True}), flush=True)\n"
        "for line in sys.stdin:\n"
        "    req = json.loads(line)\n"
        "    time.sleep(req['sleep'])\n"
        "    print(json.dumps({'echo': req['x']}), flush=True)\n"
    )
    pool = WorkerPool([sys.executable, str(script)])
    try:
        assert pool.call({"x": 1, "sleep": 0}, 30) == {"echo": 1}
        (hung,) = pool._all
        started = time.monotonic()
        assert pool.call({"x": 2, "sleep": 3600}, 0.5) is None
        assert time.monotonic() - started < 10
        assert hung.proc.poll() is not None  # killed, not left running
        assert pool.restarts == 1 and pool.size() == 0
        assert pool.call({"x": 3, "sleep": 0}, 30) == {"echo": 3}  # a fresh worker
    finally:
        pool.close()
    broken = tmp_path / "broken.py"
    broken.write_text("raise SystemExit(3)\n")
    with pytest.raises(WorkerStartError, match="did not start"):
        WorkerPool([sys.executable, str(broken)]).call({}, 5)


def test_math_args_are_checked_at_spec_validation():
    with pytest.raises(SpecError, match="timeout_s must be > 0"):
        parse_spec({"reward": {"name": "math", "args": {"timeout_s": 0}}})
    with pytest.raises(SpecError, match="unknown args: timeout"):
        parse_spec({"reward": {"name": "math", "args": {"timeout": 3}}})


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("The answer is (C)", "C"),
        ("**C**", "C"),
        ("Answer: c", "C"),
        ("answer: d.", "D"),
        ("I considered (A), but (A) fails. The answer is B.", "B"),
        ("Final answer: **b**", "B"),
        ("\\boxed{D}", "D"),
        ("\\boxed{\\text{A}}", "A"),
        ("Let me think.\nOption A is too small.\nC", "C"),
        ("The correct answer is: (E)", "E"),
        ("I pick option D", "D"),
        ("ANSWER: A", "A"),
        ("My answer is D because the rate doubles.", "D"),
        ("the answer is a bit unclear", None),  # "a" the article, not a choice
        ("Answer is c because", None),
        ("no letter at all", None),
        ("", None),
        ("The answer is F", None),  # not one of the choices
    ],
)
def test_choice_is_extracted_from_free_text(text, letter):
    assert extract_choice(text) == letter


def test_multiple_choice_reward_and_choices():
    mc = REWARDS["multiple_choice"]
    assert mc("q", "The answer is (C)", {"answer": "C"}) == 1.0
    assert mc("q", "**C**", {"answer": "(c)"}) == 1.0
    assert mc("q", "Answer: b", {"answer": "C"}) == 0.0
    assert mc("q", "nothing", {"answer": "C"}) == 0.0
    assert mc("q", "The answer is E", {"answer": "E"}, choices="ABCD") == 0.0  # E not offered
    assert mc("q", "**C**", {"answer": "C"}, score=2.0) == 2.0
    with pytest.raises(SpecError, match="choices must be distinct letters"):
        parse_spec({"reward": {"name": "multiple_choice", "args": {"choices": "AAB"}}})


def test_compute_rewards_scores_math_concurrently_in_order():
    spec = RewardSpec(name="math", workers=3)
    responses = [f"#### {i}" for i in range(9)]
    metas = [{"answer": str(i if i % 2 else i + 1)} for i in range(9)]
    out = compute_rewards(spec, [""] * 9, responses, metas)
    assert out == [float(i % 2) for i in range(9)]



def test_reward_function_starts_a_math_helper_before_serving():
    from rlhfless.functions.reward import RewardHandler
    from rlhfless.functions.serve import preload

    math_pool().close()
    assert math_pool().size() == 0
    handler = RewardHandler(RewardSpec(name="combined", args={"weights": {"math": 1.0}}))
    preload(handler, type("Store", (), {"latest": staticmethod(lambda: 0)})())
    assert math_pool().size() == 1
    restarts = math_pool().restarts
    assert MATH("q", "#### 3", {"answer": "3"}) == 1.0
    assert math_pool().size() == 1 and math_pool().restarts == restarts  # it was used
