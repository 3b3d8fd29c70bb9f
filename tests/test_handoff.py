"""The hand-off cut through the real actor functions: groups stream out as they finish; a
cut actor's unfinished samples continue inside a running actor and equal uncut generation."""

from __future__ import annotations

import asyncio

import pytest
from inprocess_runtime import InProcessRuntime

from rlhfless.driver.rollout import PromptItem, RolloutSettings, StreamingRollout
from rlhfless.model.generation import generate
from rlhfless.model.materialize import load_from_store
from rlhfless.model.sampler import prompt_key
from rlhfless.model.tokenizer import load_tokenizer
from rlhfless.scheduling.migrate import handoff_target

G, MAX_NEW, SEED = 4, 40, 11


def _items(store) -> list[PromptItem]:
    tok = load_tokenizer(store.base_dir / "tokenizer")
    texts = ["one", "two", "three", "four", "five", "six", "seven"]
    return [PromptItem(key=f"p{i}", text=t, prompt_ids=tok.encode(tok.render_prompt(t)),
                       meta={}) for i, t in enumerate(texts)]


def _rollout(job, store, items, bins, tau, **runtime_kw):
    settings = RolloutSettings(group_size=G, max_new_tokens=MAX_NEW, temperature=1.0,
                               top_p=1.0, seed=SEED, cut_fraction=tau)
    runtime = InProcessRuntime(job, store, **runtime_kw)
    runtime.prestart("actor", len(bins))  # warm actors: every stream starts at once
    groups: list[str] = []
    rollout = StreamingRollout(runtime, items, bins, 0, settings, "t", [],
                               lambda key, samples: groups.append(key))
    return asyncio.run(rollout.run()), runtime, groups


def _uncut(store, items):
    model, tok = load_from_store(store, 0)
    out = generate(model, tok, [i.prompt_ids for i in items], G, MAX_NEW, seed=SEED,
                   keys=[prompt_key(i.key) for i in items])
    return {(items[k // G].key, s["sample_index"]): s for k, s in enumerate(out)}


def test_handoff_target_is_the_running_actor_with_fewest_samples_in_flight():
    assert handoff_target({"a": 5, "b": 2, "c": 2}) == "b"
    assert handoff_target({}) is None


def test_cut_samples_continue_in_a_running_actor_exactly_as_uncut(tiny_store):
    job, store = tiny_store
    items = _items(store)
    uncut = _uncut(store, items)
    # One small bin reaches τ early while the big bin is still generating.
    result, runtime, groups = _rollout(job, store, items, [[0], [1, 2, 3, 4, 5, 6]], tau=0.25,
                                       hold_at_tau=True)
    assert result.migrated > 0, "the small actor must have been cut with unfinished samples"
    assert result.migration_actors == 1
    cut_actor = runtime.released[0]
    merges = [(inst, p) for inst, p in runtime.controls if p["op"] == "merge"]
    assert len(merges) == 1 and merges[0][0] != cut_actor  # moved once, to the other actor
    assert sorted(groups) == sorted(i.key for i in items)  # every group reported once
    for item in items:
        samples = result.samples[item.key]
        assert [s.index for s in samples] == list(range(G))
        for s in samples:
            want = uncut[(item.key, s.index)]
            assert s.response.tolist() == want["response"]  # T=1: token for token
            assert s.finished and s.logprobs.size == s.response.size
            assert max(abs(a - b) for a, b in zip(s.logprobs.tolist(), want["logprobs"],
                                                  strict=True)) < 1e-5


def test_a_group_split_over_actors_is_reported_once_whole_and_equals_unsplit(tiny_store):
    job, store = tiny_store
    items = _items(store)[:3]
    uncut = _uncut(store, items)
    # Group 1's samples run on two actors (a plan's `bin_entries` for a split group).
    result, _, groups = _rollout(job, store, items, [[0, (1, (0, 1))], [(1, (2, 3)), 2]],
                                 tau=None)
    assert sorted(groups) == ["p0", "p1", "p2"]  # p1 handed on once, when whole
    for item in items:
        samples = result.samples[item.key]
        assert [s.index for s in samples] == list(range(G))
        for s in samples:  # where a sample runs does not change it
            assert s.response.tolist() == uncut[(item.key, s.index)]["response"]


def test_the_last_actor_keeps_its_tail(tiny_store):
    job, store = tiny_store
    items = _items(store)[:2]
    result, runtime, _ = _rollout(job, store, items, [[0, 1]], tau=0.25)
    assert result.migrated == 0 and not runtime.released and not runtime.controls


def test_a_group_reported_twice_is_counted_once(tiny_store):
    job, store = tiny_store
    items = _items(store)[:3]
    result, _, groups = _rollout(job, store, items, [[0], [1, 2]], tau=None,
                                 duplicate_frames=True)
    assert sorted(groups) == ["p0", "p1", "p2"]
    assert all(len(result.samples[i.key]) == G for i in items)


@pytest.mark.parametrize("tau", [None, 0.5])
def test_grouped_streaming_reports_each_group_when_whole(tiny_store, tau):
    job, store = tiny_store
    items = _items(store)[:4]
    result, _, groups = _rollout(job, store, items, [[0, 1], [2, 3]], tau=tau)
    assert len(groups) == 4 and result.first_group_at is not None
    assert result.first_group_at <= result.ended_at
