"""The reward model (`reward.name: reward_model`): shared-prefix scores equal the model's own
forward, the directory check names the field, and the scorer function serves it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_job_yaml
from starlette.testclient import TestClient
from typer.testing import CliRunner

from rlhfless.api.spec import parse_spec
from rlhfless.cli import app
from rlhfless.functions.app import create_app
from rlhfless.functions.scorer import ScorerHandler
from rlhfless.model.fit import check_job
from rlhfless.model.loading import ModelLoadError
from rlhfless.model.reward_config import reward_model_problem
from rlhfless.model.reward_fixture import tiny_reward_model, tiny_tokenizer
from rlhfless.model.reward_model import RewardModel, _parts, load_reward_model
from rlhfless.model.shape import hf_config_shape

TOLERANCE = 1e-5  # fp32: the shared-prefix pass reorders sums, nothing more
PROMPTS = ["What is 2+3?", "Name a colour.", "x"]
RESPONSES = [["5", " The answer is 5, since 2 + 3 = 5.", ""],
             ["Blue", " red"],
             ["a fairly long reply " * 6]]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlhfless.model.reward_fixture import write_tiny_reward_model

    return write_tiny_reward_model(tmp_path_factory.mktemp("rm") / "tiny-rm")


@pytest.fixture(scope="module")
def scorer(rm_dir: Path) -> RewardModel:
    model, tokenizer = load_reward_model(rm_dir)
    return RewardModel(model, tokenizer)


def naive(model: torch.nn.Module, ids: list[int]) -> float:
    """The classifier's own forward on one unpadded sequence."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def test_shared_prefix_scores_equal_the_models_own_forward(scorer: RewardModel) -> None:
    encoded = [scorer.encode(p, rs) for p, rs in zip(PROMPTS, RESPONSES, strict=True)]
    got = scorer.score_tokens([e.prompt for e in encoded], [e.responses for e in encoded])
    want = [[naive(scorer.model, e.prompt + r) for r in e.responses] for e in encoded]
    assert [len(g) for g in got] == [3, 2, 1]
    diff = max(abs(a - b) for g, w in zip(got, want, strict=True)
               for a, b in zip(g, w, strict=True))
    assert diff < TOLERANCE, diff
    # Responses differ (variable lengths, padded together): so do their rewards.
    assert len({round(x, 4) for x in got[0]}) == 3


def test_text_scores_follow_the_items_order_and_a_group_of_one(scorer: RewardModel) -> None:
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0]]
    responses = [RESPONSES[0][0], RESPONSES[1][0], RESPONSES[0][1], RESPONSES[0][2]]
    mixed = scorer.score(prompts, responses)
    alone = [scorer.score([p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    assert max(abs(a - b) for a, b in zip(mixed, alone, strict=True)) < TOLERANCE
    e = scorer.encode(PROMPTS[1], [RESPONSES[1][0]])
    assert abs(alone[1] - naive(scorer.model, e.prompt + e.responses[0])) < TOLERANCE


def test_the_chat_template_closes_the_reply_as_the_whole_conversation_does(
        scorer: RewardModel) -> None:
    tok = scorer.hf
    e = scorer.encode("hi", ["there"])
    whole = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "there"}], tokenize=False)
    assert e.prompt + e.responses[0] == tok(whole, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id in e.responses[0]  # scored after the end of the turn


def test_a_tokenizer_without_a_template_scores_the_plain_conversation(rm_dir: Path) -> None:
    model, tokenizer = load_reward_model(rm_dir)
    tokenizer.chat_template = None
    plain = RewardModel(model, tokenizer, system_prompt="Be brief.")
    e = plain.encode("2+2?", [" 4"])
    assert tokenizer.decode(e.prompt) == "Be brief.\n\nUser: 2+2?\nAssistant:"
    assert plain.score(["2+2?"], [" 4"])[0] == pytest.approx(
        naive(model, e.prompt + e.responses[0]), abs=TOLERANCE)


def test_large_groups_are_scored_in_parts_with_the_same_rewards(scorer: RewardModel) -> None:
    encoded = [scorer.encode(p, rs) for p, rs in zip(PROMPTS, RESPONSES, strict=True)]
    prompts, groups = [e.prompt for e in encoded], [e.responses for e in encoded]
    whole = scorer.score_tokens(prompts, groups)
    small = RewardModel(scorer.model, scorer.hf, token_budget=60)
    parts = _parts(prompts, groups, 60)
    assert len(parts) > 2  # the budget really split the work, groups included
    assert sorted((g, j) for part in parts for g, lo, hi in part for j in range(lo, hi)) == [
        (g, j) for g, grp in enumerate(groups) for j in range(len(grp))]
    calls: list[int] = []
    split = small.score_tokens(prompts, groups, between=lambda: calls.append(1))
    assert len(calls) == len(parts)
    assert max(abs(a - b) for w, s in zip(whole, split, strict=True)
               for a, b in zip(w, s, strict=True)) < TOLERANCE


def test_a_long_shared_prompt_scores_like_the_models_own_forward() -> None:
    tok = tiny_tokenizer()
    model = tiny_reward_model(len(tok), hidden=64, layers=2)
    rm = RewardModel(model, tok)
    prompt = list(range(3, 3 + 200))
    group = [list(range(10, 10 + n)) for n in (8, 12, 16, 20, 9, 11, 13, 15)]
    got = rm.score_tokens([prompt], [group])[0]
    want = [naive(model, prompt + r) for r in group]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < TOLERANCE


def test_final_states_are_the_same_with_and_without_the_shared_prompt_cache(
        scorer: RewardModel) -> None:
    """The full-sequence path (taken under activation checkpointing) reads the same states."""
    from rlhfless.model.logprobs import _full_sequence_hidden, _shared_prefix_hidden

    prompts = [[5, 6, 7, 8], [9, 10]]
    responses, prompt_of = [[11, 12, 13], [], [14]], [0, 0, 1]
    with torch.no_grad():
        shared = _shared_prefix_hidden(scorer.model, prompts, responses, prompt_of, "cpu",
                                       final=True)
        full = _full_sequence_hidden(scorer.model, prompts, responses, prompt_of, "cpu",
                                     final=True)
    assert shared.shape == full.shape == (3, 4, scorer.model.config.hidden_size)
    for row, response in enumerate(responses):  # each row up to its own last token
        n = len(response) + 1
        assert torch.allclose(shared[row, :n], full[row, :n], atol=TOLERANCE)


# -- the directory check -------------------------------------------------------------------

def test_the_directory_check_says_what_is_wrong(rm_dir: Path, tmp_path: Path) -> None:
    assert reward_model_problem(rm_dir) is None
    assert "does not exist" in reward_model_problem(tmp_path / "nope")
    assert "no config.json" in reward_model_problem(tmp_path)
    config = json.loads((rm_dir / "config.json").read_text())
    for change, needle in (({"architectures": ["LlamaForCausalLM"]}, "not a sequence-class"),
                           ({"id2label": {"0": "bad", "1": "good"}}, "has 2 labels")):
        other = tmp_path / needle.split()[-1]
        other.mkdir()
        (other / "config.json").write_text(json.dumps({**config, **change}))
        (other / "model.safetensors").write_bytes(b"")
        assert needle in reward_model_problem(other)
    empty = tmp_path / "weightless"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config))
    assert "holds no weights" in reward_model_problem(empty)
    with pytest.raises(ModelLoadError, match="spec.reward.model.path: .*holds no weights"):
        load_reward_model(empty)


runner = CliRunner()


def _job(tmp_path: Path, rm_path: Path | str, steps: int = 2, extra: str = "") -> Path:
    job = tmp_path / "rm-job.yaml"
    job.write_text(tiny_job_yaml(
        "rm-job", steps, reward=f'{{name: reward_model, model: {{path: "{rm_path}"}}}}',
        scheduling="{actors: 1, maxActors: 1, prewarm: false, keepAliveS: 60}", extra=extra))
    return job


def test_validate_and_run_refuse_a_directory_that_is_no_reward_model(tmp_path: Path) -> None:
    for command in ("validate", "run"):
        result = runner.invoke(app, [command, str(_job(tmp_path, tmp_path / "missing"))],
                               env={"COLUMNS": "1000"})
        out = " ".join(result.output.split())
        assert result.exit_code == 2, out
        assert "spec.reward.model.path:" in out and "does not exist" in out
        assert "Traceback" not in out
    assert not (tmp_path / "runs").exists()


def test_validate_accepts_a_reward_model_directory(rm_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(_job(tmp_path, rm_dir))])
    assert result.exit_code == 0, result.output


# -- the memory plan -------------------------------------------------------------------------

def test_the_memory_plan_sizes_the_scorer_from_its_reward_models_config(rm_dir: Path) -> None:
    report = check_job(_spec(rm_dir))
    [est] = [e for e in report.estimates if e.stage == "scorer"]
    shape = hf_config_shape(json.loads((rm_dir / "config.json").read_text()))
    assert est.parts["weights"] >= shape.params * 4  # float32, the default dtype
    assert est.parts["kv cache"] > 0 and est.parts["activations"] > 0
    assert est.fits and not report.errors
    half = check_job(parse_spec({"reward": {"name": "reward_model", "model": {
        "path": str(rm_dir), "dtype": "bfloat16"}}}).spec)
    [bf16] = [e for e in half.estimates if e.stage == "scorer"]
    assert bf16.parts["weights"] == pytest.approx(est.parts["weights"] / 2)


def _big_reward_model(path: Path) -> Path:
    """A 70B-shaped classifier's directory (config only, an empty weights file)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
        "num_labels": 1, "hidden_size": 8192, "num_attention_heads": 64,
        "num_key_value_heads": 8, "num_hidden_layers": 80, "intermediate_size": 28672,
        "vocab_size": 128256, "max_position_embeddings": 8192}))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_a_reward_model_too_big_for_its_scorer_is_refused_naming_the_fields(
        tmp_path: Path) -> None:
    big = _big_reward_model(tmp_path / "big-rm")
    report = check_job(_spec(big), gpu_memory=(80 * 2**30, "80Gi"))
    [error] = [e for e in report.errors if e.startswith("resources.scorer:")]
    assert "reward.model.dtype: bfloat16" in error and "reward.model (a smaller one)" in error
    result = runner.invoke(app, ["validate", str(_job(tmp_path, big))],
                           env={"COLUMNS": "1000", "RLHFLESS_GPU_MEMORY": "80Gi"})
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "resources.scorer:" in out and "Traceback" not in out
    # The operator never opens a spec's paths: nothing to size there.
    assert not [e for e in check_job(_spec(big), open_files=False).estimates
                if e.stage == "scorer"]


# -- the scorer function ---------------------------------------------------------------------

def _spec(path: Path | str):
    return parse_spec({"reward": {"name": "reward_model", "model": {"path": str(path)}}}).spec


def test_the_scorer_function_answers_the_reward_contract(rm_dir: Path,
                                                         scorer: RewardModel) -> None:
    handler = ScorerHandler(_spec(rm_dir))
    items = [{"prompt": p, "response": r} for p, rs in zip(PROMPTS, RESPONSES, strict=True)
             for r in rs]
    with TestClient(create_app(handler, token="t"),
                    headers={"Authorization": "Bearer t"}) as client:
        reply = client.post("/invoke", json={"request_id": "r1", "items": items})
        assert reply.status_code == 200, reply.text
        assert client.post("/invoke", json={"request_id": "r2", "items": items},
                           headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/healthz").json()["stage"] == "scorer"
    body = reply.json()
    want = scorer.score([i["prompt"] for i in items], [i["response"] for i in items])
    assert body["rewards"] == pytest.approx(want, abs=TOLERANCE)
    assert body["stats"]["items"] == len(items)


def test_a_scorer_without_its_model_names_the_field_on_every_request(tmp_path: Path) -> None:
    handler = ScorerHandler(_spec(tmp_path / "gone"))
    with TestClient(create_app(handler, token="t"),
                    headers={"Authorization": "Bearer t"}) as client:
        reply = client.post("/invoke", json={"request_id": "r", "items": [
            {"prompt": "p", "response": "r"}]})
    assert reply.status_code == 500
    assert "spec.reward.model.path" in reply.json()["error"]
    assert str(tmp_path) not in reply.json()["error"]  # no path leaves the function


def test_an_instance_of_a_stage_the_job_does_not_have_refuses_to_start(
        rm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from rlhfless.functions.serve import main

    monkeypatch.setenv("RLHFLESS_TOKEN", "t")
    job = _job(tmp_path, rm_dir)
    with pytest.raises(SystemExit) as exc:
        main(["--stage", "reward", "--store", str(tmp_path / "store"), "--job", str(job)])
    assert exc.value.code == 2
    assert ("this job has no reward stage (its stages: actor, scorer, learner)"
            in capsys.readouterr().err)


@pytest.mark.slow
def test_a_reward_model_job_runs_end_to_end(rm_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = runner.invoke(app, ["run", str(_job(tmp_path, rm_dir)), "--run-dir",
                                 str(run_dir)], env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # Rewards came from the reward model: logits, not the 0/1 of a rule.
    rewards = {r["reward/mean"] for r in rows} | {r["reward/max"] for r in rows}
    assert any(x not in (0.0, 1.0) for x in rewards), rewards
    # Timed as verl times a reward model (`timing_s/reward`), billed to the scorer.
    assert all(r["timing_s/reward"] > 0 and "cost/gpu_seconds/scorer" in r for r in rows)
    assert not any("cost/gpu_seconds/reward" in r for r in rows)
    logs = {p.name for p in (run_dir / "logs").iterdir()}
    assert any(name.startswith("scorer") for name in logs), logs
    assert not any(name.startswith("reward") for name in logs), logs
    print(f"reward-model job: 2 steps in {time.monotonic() - started:.1f} s")
