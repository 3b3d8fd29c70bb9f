"""File datasets: parquet in verl's schema, field mapping, save_to_disk directories, errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rlhfless.api.spec import DatasetSpec, RewardSpec, SpecError, parse_spec
from rlhfless.cli import app
from rlhfless.model.tokenizer import CharTokenizer
from rlhfless.rewards import (
    DatasetError,
    batch_for_step,
    chat_messages,
    load_dataset,
    reward_meta,
)
from rlhfless.rewards.samples import code_rows, math_rows


def verl_rows(n: int = 6) -> list[dict]:
    """Rows exactly as verl's gsm8k preprocessing writes them."""
    return [{
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": f"What is {i} + {i}? Let's think step by step "
                    "and output the final answer after \"####\"."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
        "extra_info": {"split": "train", "index": i, "answer": f"{i}+{i}={2 * i} #### {2 * i}"},
    } for i in range(n)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_verl_parquet_loads_with_its_chat_prompt_ground_truth_and_meta(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", verl_rows())
    items = load_dataset(DatasetSpec(kind="parquet", path=str(path)), RewardSpec(name="math"))
    assert [i["id"] for i in items] == [f"train-{i}" for i in range(6)]
    first = items[3]
    assert first["answer"] == "6"
    assert first["prompt"].startswith("What is 3 + 3?")
    assert first["messages"] == [{"role": "user", "content": first["prompt"]}]
    meta = reward_meta(first)
    assert meta == {"answer": "6", "data_source": "openai/gsm8k",
                    "extra_info": {"split": "train", "index": 3, "answer": "3+3=6 #### 6"}}
    json.dumps(meta)  # it travels to the reward function as JSON
    # The chat prompt is what the actor sees (the tokenizer's chat template renders it).
    tok = CharTokenizer()
    rendered = tok.render_chat(chat_messages(first, "Be brief."))
    assert rendered == f"Be brief.\n\nUser: {first['prompt']}\nAssistant:"
    assert rendered == tok.render_prompt(first["prompt"], "Be brief.")


def test_multi_turn_and_system_messages_render_in_order(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                        {"role": "assistant", "content": "a1"},
                        {"role": "user", "content": "u2"}],
             "reward_model": {"ground_truth": "1"}}]
    item = load_dataset(DatasetSpec(kind="parquet", path=str(
        write_parquet(tmp_path / "t.parquet", rows))))[0]
    assert item["prompt"] == "u2"
    messages = chat_messages(item, "ignored: the row has its own system message")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert CharTokenizer().render_chat(messages) == "S\n\nUser: u1\nAssistant: a1\nUser: u2\n" \
                                                    "Assistant:"


def test_field_mapping_reads_other_schemas(tmp_path):
    rows = [{"question": f"q{i}", "meta": {"gold": {"letter": "ABCD"[i % 4]}}, "uid": f"u{i}"}
            for i in range(5)]
    path = write_parquet(tmp_path / "gpqa.parquet", rows)
    spec = DatasetSpec(kind="parquet", path=str(path),
                       fields={"prompt": "question", "answer": "meta.gold.letter", "id": "uid"})
    items = load_dataset(spec, RewardSpec(name="multiple_choice"))
    assert [(i["id"], i["prompt"], i["answer"]) for i in items][:2] == [
        ("u0", "q0", "A"), ("u1", "q1", "B")]
    # the same mapping works for jsonl, camelCase keys in a job file
    jsonl = tmp_path / "gpqa.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = parse_spec({"dataset": {"kind": "jsonl", "path": str(jsonl), "fields": {
        "prompt": "question", "answer": "meta.gold.letter", "id": "uid"}},
        "reward": {"name": "multiple_choice"}})
    assert load_dataset(job.spec.dataset, job.spec.reward) == [
        {**r, **{k: i[k] for k in ("id", "prompt", "answer", "system")}}
        for r, i in zip(rows, items, strict=True)]


def test_hf_disk_dataset_and_dataset_dict_with_split(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = verl_rows(4)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}
                ).save_to_disk(str(tmp_path / "dict"))
    one = load_dataset(DatasetSpec(kind="hf-disk", path=str(tmp_path / "one")),
                       RewardSpec(name="math"))
    assert [i["answer"] for i in one] == ["0", "2", "4", "6"]
    assert one[1]["messages"][0]["role"] == "user" and one[1]["data_source"] == "openai/gsm8k"
    test = load_dataset(DatasetSpec(kind="hf-disk", path=str(tmp_path / "dict"), split="test"))
    assert len(test) == 1
    with pytest.raises(DatasetError, match=r"no split 'valid' \(dataset.split\); splits: test, "
                                           "train"):
        load_dataset(DatasetSpec(kind="hf-disk", path=str(tmp_path / "dict"), split="valid"))
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(DatasetSpec(kind="hf-disk", path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="cannot read .* as a saved dataset"):
        load_dataset(DatasetSpec(kind="hf-disk", path=str(tmp_path / "empty")))


def test_missing_prompt_column_names_it_and_lists_the_columns(tmp_path):
    rows = [{"question": "q", "reward_model": {"ground_truth": "1"}}]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DatasetError, match=r"bad\.parquet: no column 'prompt' "
                                           r"\(dataset\.fields\.prompt is 'prompt'\); "
                                           r"columns: question, reward_model"):
        load_dataset(DatasetSpec(kind="parquet", path=str(path)))
    with pytest.raises(DatasetError, match=r"no column 'gold' \(dataset\.fields\.answer"):
        load_dataset(DatasetSpec(kind="parquet", path=str(path),
                                 fields={"prompt": "question", "answer": "gold"}))
    # a nested field that is absent in a row
    with pytest.raises(DatasetError, match=r"row 0: no field 'reward_model.label' "
                                           r"\(dataset\.fields\.answer\)"):
        load_dataset(DatasetSpec(kind="parquet", path=str(path),
                                 fields={"prompt": "question", "answer": "reward_model.label"}))


TESTS = json.dumps({"inputs": ["1\n"], "outputs": ["1\n"]})


@pytest.mark.parametrize(
    ("reward", "good", "bad", "message"),
    [
        ({"name": "math"}, "2", ["1", "2"],
         r"must be a string or a number, got list \(reward 'math'\)"),
        ({"name": "math"}, "2", "", r"is missing or empty"),
        ({"name": "multiple_choice"}, "B", "F", r"must be one letter of ABCDE .* got 'F'"),
        ({"name": "multiple_choice", "args": {"choices": "ABCD"}}, "(b)", "E",
         "one letter of ABCD"),
        ({"name": "code_tests"}, TESTS, 42, r"must be test cases .* got int"),
        ({"name": "code_tests"}, TESTS, json.dumps({"inputs": ["1"], "outputs": []}),
         "has 1 inputs but 0 outputs"),
        ({"name": "code_tests"}, TESTS, "print(1)", "not JSON test cases"),
        ({"name": "exact_match"}, "2", {"a": 1}, r"must be a string or a number, got dict"),
        ({"name": "combined", "args": {"weights": {"format": 0.1, "math": 1.0}}}, "2", "",
         "reward 'math'"),
    ],
)
def test_ground_truth_of_the_wrong_type_names_the_row_and_field(tmp_path, reward, good, bad,
                                                                message):
    rows = verl_rows(3)
    for row in rows:
        row["reward_model"]["ground_truth"] = good
    rows[2]["reward_model"]["ground_truth"] = bad
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match=rf"t\.jsonl:3: 'reward_model.ground_truth' .*{message}"):
        load_dataset(DatasetSpec(kind="jsonl", path=str(jsonl)), RewardSpec(**reward))
    rows.pop()
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_dataset(DatasetSpec(kind="jsonl", path=str(jsonl)), RewardSpec(**reward))) == 2


def test_parquet_ground_truth_of_the_wrong_type(tmp_path):
    rows = verl_rows(2)
    for row in rows:
        row["reward_model"]["ground_truth"] = [1.5, 2.5]
    path = write_parquet(tmp_path / "lists.parquet", rows)
    with pytest.raises(DatasetError, match=r"lists\.parquet row 0: 'reward_model.ground_truth' "
                                           r"must be a string or a number, got list"):
        load_dataset(DatasetSpec(kind="parquet", path=str(path)), RewardSpec(name="math"))


def test_rewards_that_need_no_answer_accept_any_ground_truth(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", code_rows())
    items = load_dataset(DatasetSpec(kind="parquet", path=str(path)),
                         RewardSpec(name="target_char"))
    assert len(items) == len(code_rows())


def test_epochs_reshuffle_with_the_seed(tmp_path):
    path = write_parquet(tmp_path / "m.parquet", math_rows(12))
    items = load_dataset(DatasetSpec(kind="parquet", path=str(path)), RewardSpec(name="math"))
    epochs = [[i["id"] for i in batch_for_step(items, e, 12, seed=5)] for e in range(3)]
    assert all(Counter(e) == Counter(i["id"] for i in items) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # a new order every epoch
    assert epochs[0] != [i["id"] for i in items]  # shuffled, not file order
    assert [i["id"] for i in batch_for_step(items, 0, 12, seed=6)] != epochs[0]
    assert [i["id"] for i in batch_for_step(items, 1, 12, seed=5)] == epochs[1]


def test_unreadable_and_malformed_files(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DatasetError, match="cannot read .*x.parquet as parquet"):
        load_dataset(DatasetSpec(kind="parquet", path=str(bad)))
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(DatasetSpec(kind="parquet", path=str(tmp_path / "none.parquet")))
    rows = [{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                           "content": "x"}]}]
    with pytest.raises(DatasetError, match="last message must be the user's"):
        load_dataset(DatasetSpec(kind="parquet", path=str(write_parquet(tmp_path / "a.parquet",
                                                                         rows))))
    rows = [{"prompt": [{"role": "robot", "content": "hi"}]}]
    with pytest.raises(DatasetError, match=r"row 0: 'prompt'\[0\] needs a role"):
        load_dataset(DatasetSpec(kind="parquet", path=str(write_parquet(tmp_path / "b.parquet",
                                                                         rows))))
    dup = [{"prompt": "a", "id": "1"}, {"prompt": "b", "id": "1"}]
    with pytest.raises(DatasetError, match=r"row 1: duplicate id '1' \(first on row 0\)"):
        load_dataset(DatasetSpec(kind="parquet", path=str(write_parquet(tmp_path / "d.parquet",
                                                                         dup))))


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "hf-disk"])
def test_file_kinds_need_a_path(kind):
    with pytest.raises(SpecError,
                       match=f"spec.dataset.path: is required when kind is '{kind}'"):
        parse_spec({"dataset": {"kind": kind}})


def test_generator_kinds_read_no_path():
    with pytest.raises(SpecError, match="spec.dataset.path: kind 'repeat' reads no file"):
        parse_spec({"dataset": {"kind": "repeat", "path": "/data/x.jsonl"}})


def test_validate_reads_a_local_dataset_with_the_reward(tmp_path):
    good = write_parquet(tmp_path / "good.parquet", verl_rows())
    bad = write_parquet(tmp_path / "bad.parquet", [{"question": "q"}])

    def job(path: Path, reward: str = "math") -> Path:
        f = tmp_path / f"{path.stem}-{reward}.yaml"
        f.write_text(json.dumps({"apiVersion": "rlhfless.io/v1alpha1", "kind": "RLHFJob",
                                 "metadata": {"name": "v"}, "spec": {
                                     "dataset": {"kind": "parquet", "path": str(path)},
                                     "reward": {"name": reward}}}))
        return f

    def validate(path: Path, reward: str = "math") -> tuple[int, str]:
        result = CliRunner().invoke(app, ["validate", str(job(path, reward))])
        return result.exit_code, " ".join(result.output.split())

    code, out = validate(good)
    assert code == 0 and "dataset: 6 prompts" in out
    code, out = validate(bad)
    assert code == 2 and "no column 'prompt'" in out and "Traceback" not in out
    code, out = validate(good, "multiple_choice")
    assert code == 2 and "row 0: 'reward_model.ground_truth' must be one letter" in out
    code, out = validate(tmp_path / "elsewhere.parquet")
    assert code == 0 and "not on this machine" in out


def test_a_bad_dataset_stops_the_run_before_the_first_step(tmp_path):
    from types import SimpleNamespace

    from rlhfless.driver import Driver
    from tests.conftest import tiny_job

    bad = write_parquet(tmp_path / "bad.parquet", [{"question": "q"}])
    job = tiny_job("bad", dataset={"kind": "parquet", "path": str(bad)},
                   reward={"name": "math", "args": {}})
    driver = Driver(job, SimpleNamespace(), tmp_path / "run")
    with pytest.raises(DatasetError, match="no column 'prompt'"):
        driver.prepare()
    assert not (tmp_path / "run" / "tensorboard").exists()  # nothing opened for a failed start
