"""Datasets: arithmetic generator, repeat toy set, jsonl loader, per-step batches."""

import re
from collections import Counter

import pytest

from rlhfless.api.spec import DatasetSpec
from rlhfless.rewards import (
    REWARDS,
    DatasetError,
    batch_for_step,
    generate_problems,
    load_dataset,
    load_jsonl,
)


def _solve(prompt: str) -> int:
    """Independent solver of the generated templates (reads the sentences in order)."""
    have = int(re.match(r"\w+ has (\d+)", prompt).group(1))
    for sentence in re.split(r"(?<=\.) ", prompt)[1:]:
        if m := re.search(r"(?:gives \w+|finds|buys) (\d+) more", sentence):
            have += int(m.group(1))
        elif m := re.search(r"(?:gives|loses|uses) (\d+) ", sentence):
            have -= int(m.group(1))
        elif m := re.search(r"(\d+) times as many", sentence):
            have *= int(m.group(1))
    return have


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_arithmetic_answers_are_correct_and_seeded(difficulty):
    probs = generate_problems(60, seed=3, difficulty=difficulty)
    assert probs == generate_problems(60, seed=3, difficulty=difficulty)
    assert probs != generate_problems(60, seed=4, difficulty=difficulty)
    assert len({p["id"] for p in probs}) == 60
    for p in probs:
        assert set(p) == {"id", "prompt", "answer"}
        assert int(p["answer"]) == _solve(p["prompt"]) >= 0
        assert REWARDS["exact_match"](p["prompt"], f"#### {p['answer']}", p) == 1.0
    steps = [p["prompt"].split("How many")[0].count(".") for p in probs]
    assert max(steps) == (3 if difficulty >= 4 else 2)  # two-step problems at 4-5


def test_arithmetic_difficulty_grows_numbers_and_uses_all_ops():
    easy = [int(p["answer"]) for p in generate_problems(200, difficulty=1)]
    hard = [int(p["answer"]) for p in generate_problems(200, difficulty=5)]
    assert max(easy) <= 9 * 5 and sum(hard) > 10 * sum(easy)
    text = " ".join(p["prompt"] for p in generate_problems(100, difficulty=2))
    assert "more" in text and "times as many" in text and re.search(r"loses|uses|gives \d", text)
    with pytest.raises(ValueError):
        generate_problems(3, difficulty=9)


def test_load_dataset_kinds_and_system_prompt(tmp_path):
    arith = load_dataset(DatasetSpec(kind="arithmetic", size=5, seed=1, difficulty=2,
                                     system_prompt="Be brief."))
    assert len(arith) == 5 and all(d["system"] == "Be brief." for d in arith)
    assert arith[0]["id"] == "arith-d2-s1-0"
    rep = load_dataset(DatasetSpec(kind="repeat", size=12))
    assert [d["id"] for d in rep][:2] == ["repeat-0", "repeat-1"]
    assert len({d["prompt"] for d in rep}) == 12 and rep[0]["system"] is None
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": 4}\n\n{"prompt": "1+1?", "id": "x", "k": 1}\n')
    js = load_dataset(DatasetSpec(kind="jsonl", path=str(path)))
    assert js == [
        {"id": "d-1", "prompt": "2+2?", "answer": "4", "system": None},
        {"id": "x", "prompt": "1+1?", "answer": "", "k": 1, "system": None},
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a"}\n{oops\n', r"d\.jsonl:2: invalid JSON"),
        ('["a"]\n', r"d\.jsonl:1: expected a JSON object"),
        ('{"answer": "1"}\n', r"d\.jsonl:1: no field 'prompt' \(dataset\.fields\.prompt\)"),
        ('{"prompt": 3}\n', r"'prompt' must be a non-empty string"),
        ('{"prompt": "a", "answer": [1]}\n', r"'answer' must be a string or a number"),
        ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": "1"}\n',
         r"d\.jsonl:2: duplicate id '1' \(first on line 1\)"),
        ("\n\n", r"no prompts found"),
        ('{"prompt": "a", "max_new_tokens": 0}\n', r"d\.jsonl:1: 'max_new_tokens' must be a "
         "positive integer"),
        ('{"prompt": "a", "max_new_tokens": "9"}\n', r"'max_new_tokens' must be a positive"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_jsonl(path)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="cannot read dataset"):
        load_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_jsonl(bad)


def test_batches_cover_each_epoch_and_recur():
    data = [{"id": str(i)} for i in range(10)]
    per_step = 4
    batches = [batch_for_step(data, s, per_step, seed=7) for s in range(10)]  # 4 epochs
    flat = [d["id"] for b in batches for d in b]
    for epoch in range(4):
        assert sorted(flat[epoch * 10:(epoch + 1) * 10]) == sorted(d["id"] for d in data)
    assert flat[:10] != flat[10:20]  # a fresh permutation each epoch
    assert batches == [batch_for_step(data, s, per_step, seed=7) for s in range(10)]
    assert batch_for_step(data, 0, per_step, seed=8) != batches[0]
    assert Counter(flat) == Counter({str(i): 4 for i in range(10)})


def test_batch_larger_than_dataset_and_bad_args():
    data = [{"id": "a"}, {"id": "b"}]
    batch = batch_for_step(data, 0, 5, seed=0)
    assert len(batch) == 5 and Counter(d["id"] for d in batch)["a"] >= 2
    with pytest.raises(ValueError):
        batch_for_step([], 0, 2, 0)
    with pytest.raises(ValueError):
        batch_for_step(data, -1, 2, 0)
