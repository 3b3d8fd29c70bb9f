"""The driver's streaming step against in-process functions: the same update as the barrier
step, groups going to the learner inline or as store shards, the overlap measured."""

from __future__ import annotations

import asyncio
import json

import pytest
from inprocess_runtime import InProcessRuntime

from rlhfless.driver import Driver
from rlhfless.driver.records import MetricsLog, overlap_seconds, union_spans
from rlhfless.store import ShardStore, WeightStore
from tests.conftest import tiny_job


def _one_step(tmp_path, name, inline_limit=1 << 20, dataset=None, generation=None,
              **scheduling):
    extra = {k: v for k, v in (("dataset", dataset), ("generation", generation)) if v}
    job = tiny_job(name, steps=1, algorithm={"lr": 1e-4, "entropyCoef": 0.01},
                   scheduling={"prewarm": False, "actors": 2, "costAware": False,
                               "tau": 0.5, **scheduling}, **extra)
    run_dir = tmp_path / name
    runtime = InProcessRuntime(job, WeightStore(run_dir / "store"))

    async def go():
        return await Driver(job, runtime, run_dir, inline_limit=inline_limit).run()

    assert asyncio.run(go()) == 1
    weights, _ = WeightStore(run_dir / "store").load(1)
    return weights, MetricsLog(run_dir / "metrics.jsonl").read()[0], runtime


def test_streaming_and_barrier_steps_train_the_same_weights(tmp_path):
    streamed, row_s, rt_s = _one_step(tmp_path, "stream", inline_limit=0)
    barrier, row_b, _ = _one_step(tmp_path, "barrier", streaming=False)
    dw = max(float((streamed[k] - barrier[k]).abs().max()) for k in streamed)
    assert dw <= 1e-5
    start, _ = WeightStore(tmp_path / "stream" / "store").load(0)
    assert max(float((streamed[k] - start[k]).abs().max()) for k in streamed) > 1e-5
    assert row_s["reward/mean"] == row_b["reward/mean"]
    assert row_s["train/num_tokens"] == row_b["train/num_tokens"]
    # inline_limit 0: every group reached the learner as a shard of the store, by id
    adds = [p for stage, p in rt_s.calls if stage == "learner" and p["op"] == "add"]
    assert len(adds) == 4 and all(p["shard"] and p["group"] is None for p in adds)
    for key in ("timing_s/overlap", "timing_s/after_rollout", "timing_share/after_rollout",
                "timing_s/first_group", "timing_s/update_actor", "timing_s/reward"):
        assert key in row_s, key
    assert row_b["timing_s/overlap"] == 0.0  # barrier: the learner waits for every actor
    assert row_b["timing_s/first_group"] <= row_b["timing_s/gen"] + 1e-6


def _budgets_file(tmp_path, budgets):
    path = tmp_path / "budgets.jsonl"
    path.write_text("".join(json.dumps({"id": k, "prompt": f"{k}:", "max_new_tokens": n}) + "\n"
                            for k, n in budgets.items()))
    return {"kind": "jsonl", "path": str(path), "promptsPerStep": len(budgets)}


def test_each_prompt_keeps_its_own_response_budget(tmp_path):
    budgets = {"a": 2, "b": 5, "c": 8, "d": 30}
    _, row, runtime = _one_step(tmp_path, "budget", dataset=_budgets_file(tmp_path, budgets))
    adds = [p["group"] for stage, p in runtime.calls if stage == "learner" and p["op"] == "add"]
    assert len(adds) == 4 and row["response_length/max"] <= 8  # maxNewTokens caps "d"
    for group in adds:
        cap = min(budgets[group["group_id"]], 8)
        assert all(r.size <= cap for r in group["responses"])
    assert max(r.size for g in adds if g["group_id"] == "a" for r in g["responses"]) <= 2


def test_the_learner_works_while_the_actor_still_generates(tmp_path):
    # One actor: three groups end after a token, the fourth decodes 47 more while the
    # learner already scores and back-propagates the first three.
    dataset = _budgets_file(tmp_path, {"a": 1, "b": 1, "c": 1, "d": 48})
    _, row, _ = _one_step(tmp_path, "overlap", dataset=dataset,
                          generation={"maxNewTokens": 48}, actors=1)
    assert row["response_length/max"] > 1
    assert row["timing_s/overlap"] > 0
    assert row["timing_share/after_rollout"] < 1


def test_shards_of_a_checkpointed_step_are_pruned(tmp_path):
    _one_step(tmp_path, "prune", inline_limit=0)
    assert ShardStore(tmp_path / "prune" / "store").steps() == []


def test_span_arithmetic():
    assert union_spans([(3, 4), (0, 1), (0.5, 2), (5, 5)]) == [(0, 2), (3, 4)]
    assert overlap_seconds([(0, 2), (3, 4)], [(1, 3.5), (10, 11)]) == pytest.approx(1.5)
    assert overlap_seconds([], [(0, 1)]) == 0.0


def test_timeline_plot_draws_alive_and_busy_spans(tmp_path, monkeypatch):
    from rlhfless.driver import plots
    from rlhfless.driver.plots import plot_timeline

    drawn, save = [], plots._save

    def keep_axes(fig, path):
        drawn.append(fig.axes[0])
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep_axes)

    row = {"step": 1, "timing_s/step": 2.0, "timing_s/gen": 1.5, "timing_s/overlap": 0.7,
           "timeline": [
               {"stage": "actor", "instance": "actor-0", "start": 0.0, "end": 2.0,
                "cold_start": 0.2, "busy": [[0.1, 1.5]]},
               {"stage": "learner", "instance": "learner-1", "start": -5.0, "end": 2.0,
                "cold_start": 3.0, "busy": [[0.3, 0.4], [0.8, 1.9]]}]}
    path = plot_timeline([row], tmp_path / "timeline.png")
    assert path.stat().st_size > 1000
    [ax] = drawn
    bars = [(round(p.get_x(), 3), round(p.get_width(), 3), round(p.get_y() + p.get_height() / 2),
             p.get_alpha()) for p in ax.patches if p.get_width() > 0]
    # actor lane 0: alive 0..2 (light), cold start hatched, busy 0.1..1.5 (dark)
    assert (0.0, 2.0, 0, 0.3) in bars and (0.1, 1.4, 0, None) in bars
    assert (0.0, 0.2, 0, None) in bars  # the hatched cold start
    # learner lane 1: alive from before the step (clipped to 0), no cold start in the step,
    # busy twice
    assert (0.0, 2.0, 1, 0.3) in bars
    assert (0.3, 0.1, 1, None) in bars and (0.8, 1.1, 1, None) in bars
    assert len([b for b in bars if b[2] == 1]) == 3
    assert [t.get_text() for t in ax.get_yticklabels()][0].startswith("actor-0")
    assert "0.70 s" in ax.get_title()
