"""Model layer on tiny random GPT-2 models: loading, shared-prefix scoring, sampling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhfless.model import (
    CharTokenizer,
    ModelLoadError,
    ValueModel,
    choose_tokens,
    generate,
    grouped_forward,
    grouped_logprobs,
    load_base,
    prompt_key,
    sample_uniform,
    sequence_logprobs,
)
from rlhfless.model.checkpointing import enable_checkpointing
from rlhfless.model.generation import GenerationSession, Row

TOL = 1e-4


def tiny_spec(seed: int = 0, vocab: int = 128, **kw) -> SimpleNamespace:
    tiny = dict(vocab_size=vocab, n_layer=2, n_embd=64, n_head=4, n_positions=256, seed=seed)
    tiny.update(kw)
    return SimpleNamespace(source="tiny", path=None, gguf_file=None, tiny=SimpleNamespace(**tiny))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On shared CPUs extra torch threads spin against other processes; one is faster there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return load_base(tiny_spec())


@pytest.fixture(scope="module")
def eos_prone():
    """A tiny model whose EOS logit is scaled up, so samples end at different lengths."""
    model, tok = load_base(tiny_spec())
    with torch.no_grad():
        model.transformer.wte.weight[tok.eos_token_id] *= 4.0  # tied with lm_head
    return model, tok


def ragged_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(n: int) -> list[int]:
        return torch.randint(2, 128, (n,), generator=gen).tolist()

    prompts = [rnd(5), rnd(17), rnd(1), rnd(9)]
    groups = [
        [rnd(3), rnd(10), []],
        [rnd(1)],
        [rnd(7), rnd(2)],
        [rnd(12), rnd(4), rnd(4), rnd(1)],
    ]
    return prompts, groups


def flatten(prompts, groups):
    return [p for p, g in zip(prompts, groups, strict=True) for _ in g], [
        r for g in groups for r in g
    ]


def max_delta(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(((x - y).abs().max().item() for x, y in zip(a, b, strict=True) if x.numel()))


# ---- tokenizer and loading -----------------------------------------------------------------
def test_char_tokenizer_roundtrip_and_specials():
    tok = CharTokenizer()
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1 and tok.vocab_size == 128
    ids = tok.encode("Hi 42!")
    assert ids == [72, 105, 32, 52, 50, 33]
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id]) == "Hi 42!"
    assert tok.encode("é") == [ord("?")]
    assert tok.decode([200]) == "?"
    prompt = tok.render_prompt("2+3?", system="Be brief.")
    assert prompt.startswith("Be brief.") and "2+3?" in prompt and prompt.endswith("Assistant:")


def test_tiny_is_deterministic_per_seed():
    a, _ = load_base(tiny_spec(seed=1))
    b, _ = load_base(tiny_spec(seed=1))
    c, _ = load_base(tiny_spec(seed=2))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.transformer.h[0].mlp.c_fc.weight, c.transformer.h[0].mlp.c_fc.weight)
    assert not a.training and next(a.parameters()).dtype == torch.float32


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="128"):
        load_base(tiny_spec(vocab=64))
    hf = SimpleNamespace(source="hf", path=str(tmp_path / "nope"), gguf_file=None, tiny=None)
    with pytest.raises(ModelLoadError, match="config.json"):
        load_base(hf)
    gguf = SimpleNamespace(source="gguf", path=str(tmp_path), gguf_file="x.gguf", tiny=None)
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_base(gguf)


# ---- scoring -------------------------------------------------------------------------------
def test_grouped_matches_naive_with_ragged_prompts_and_responses(tiny):
    model, _ = tiny
    prompts, groups = ragged_batch()
    with torch.no_grad():
        grouped = grouped_logprobs(model, prompts, groups)
        naive = sequence_logprobs(model, *flatten(prompts, groups))
    flat = [x for g in grouped for x in g]
    assert [len(x) for x in flat] == [len(r) for g in groups for r in g]
    assert max_delta(flat, naive) <= TOL
    # prompt tokens computed once per group instead of once per response
    assert grouped.prefill_tokens_saved == 5 * 2 + 17 * 0 + 1 * 1 + 9 * 3


def test_grouped_gradients_match_naive(tiny):
    model, _ = tiny
    prompts, groups = ragged_batch(seed=1)
    model.zero_grad()
    loss = sum(x.sum() for g in grouped_logprobs(model, prompts, groups) for x in g)
    loss.backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss_naive = sum(x.sum() for x in sequence_logprobs(model, *flatten(prompts, groups)))
    loss_naive.backward()
    assert abs(loss.item() - loss_naive.item()) <= TOL * abs(loss_naive.item())
    for name, p in model.named_parameters():
        assert torch.isfinite(shared[name]).all(), name
        scale = p.grad.abs().max().item() + 1e-6
        assert (shared[name] - p.grad).abs().max().item() <= 1e-4 * scale + 1e-6, name
    assert model.transformer.wpe.weight.grad.abs().sum() > 0  # the prompt pass got gradient
    model.zero_grad()


def test_checkpointed_training_falls_back_to_full_sequences():
    model, _ = load_base(tiny_spec())
    prompts, groups = ragged_batch(seed=2)
    with torch.no_grad():
        naive = sequence_logprobs(model, *flatten(prompts, groups))
    enable_checkpointing(model)
    out = grouped_logprobs(model, prompts, groups)
    assert out.prefill_tokens_saved == 0  # the cache is dropped by checkpointed layers
    assert max_delta([x for g in out for x in g], naive) <= TOL
    sum(x.sum() for g in out for x in g).backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


def test_value_head_reads_the_states_before_each_response_token(tiny):
    model, _ = tiny
    critic = ValueModel(model, seed=3)
    prompts, groups = ragged_batch(seed=3)
    values = critic.grouped_values(prompts, groups)
    for prompt, group, vals in zip(prompts, groups, values, strict=True):
        for response, v in zip(group, vals, strict=True):
            ids = torch.tensor([prompt + response])
            hidden = model.base_model(input_ids=ids).last_hidden_state[0]
            p = len(prompt)
            expected = critic.head(hidden[p - 1 : p - 1 + len(response)]).squeeze(-1)
            assert v.shape == (len(response),)
            if len(response):
                assert (v - expected).abs().max().item() <= TOL
    flat_prompts, flat_responses = flatten(prompts, groups)
    flat = critic.values(flat_prompts, flat_responses)
    assert max_delta(flat, [v for g in values for v in g]) <= TOL
    via_logprobs = grouped_logprobs(model, prompts, groups, with_values_head=critic.head)
    assert max_delta([v for g in via_logprobs.values for v in g], flat) <= TOL
    critic.zero_grad()
    sum(v.sum() for v in flat).backward()
    assert critic.head.weight.grad.abs().sum() > 0
    assert model.transformer.h[1].mlp.c_proj.weight.grad.abs().sum() > 0
    critic.zero_grad()


def test_grouped_forward_rejects_bad_input(tiny):
    model, _ = tiny
    with pytest.raises(ValueError):
        grouped_forward(model, [[1, 2]], [])
    with pytest.raises(ValueError, match="empty prompt"):
        grouped_forward(model, [[]], [[[3]]])
    with pytest.raises(ValueError, match="positions"):
        grouped_logprobs(model, [[5] * 200], [[[6] * 100]])


# ---- sampling ------------------------------------------------------------------------------
def test_choose_tokens_inverse_cdf_top_p_and_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(3, 1)
    u = torch.tensor([0.1, 0.7, 0.9])
    assert choose_tokens(logits, u, 1.0, 1.0).tolist() == [0, 1, 2]
    # top_p 0.6 keeps {0, 1} (mass 0.8), renormalised: u=0.7 -> 0.56 -> token 1
    assert choose_tokens(logits, u, 1.0, 0.6).tolist() == [0, 1, 1]
    assert choose_tokens(logits, u, 0.0, 1.0).tolist() == [0, 0, 0]
    shuffled = logits[:, [2, 0, 1]]  # top-p order follows probabilities, not ids
    assert choose_tokens(shuffled, u, 1.0, 0.6).tolist() == [1, 2, 2]


def test_counter_based_randomness():
    draws = {sample_uniform(7, k, s, t) for k in range(3) for s in range(3) for t in range(3)}
    assert len(draws) == 27 and all(0.0 <= u < 1.0 for u in draws)
    assert sample_uniform(7, 1, 2, 3) == sample_uniform(7, 1, 2, 3)
    assert sample_uniform(7, 1, 2, 3) != sample_uniform(8, 1, 2, 3)
    assert prompt_key("gsm8k-17") == prompt_key("gsm8k-17") != prompt_key("gsm8k-18")


def greedy_reference(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding with a full forward per token (no cache, no padding)."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([prompt + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
    return out


def test_greedy_generation_matches_uncached_reference(eos_prone):
    model, tok = eos_prone
    prompts = [tok.encode(tok.render_prompt(w)) for w in ["hello", "abc", "x" * 30]]
    result = generate(model, tok, prompts, n=2, max_new_tokens=16, temperature=0.0, seed=0)
    assert result.prefill_tokens_saved == sum(len(p) for p in prompts)
    for s in result:
        ref = greedy_reference(model, prompts[s["prompt_index"]], 16, tok.eos_token_id)
        assert s["response"] == ref
        assert s["finished"] and s["stop_reason"] == ("eos" if ref[-1] == 0 else "length")
    with torch.no_grad():
        scored = sequence_logprobs(
            model, [prompts[s["prompt_index"]] for s in result], [s["response"] for s in result]
        )
    assert max_delta([torch.tensor(s["logprobs"]) for s in result], scored) <= TOL


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_cut_and_continue_reproduces_uncut_samples(eos_prone, temperature, top_p):
    model, tok = eos_prone
    prompts = [tok.encode(tok.render_prompt(w)) for w in ["hello", "what is 2+3", "zz", "x" * 30]]
    n, cap = 3, 20
    kw = dict(max_new_tokens=cap, temperature=temperature, top_p=top_p, seed=11)
    keys = [prompt_key(f"p{i}") for i in range(len(prompts))]
    full = generate(model, tok, prompts, n, keys=keys, **kw)
    assert all(s["finished"] for s in full)
    # One token per sample per decode step: a shorter sample never finishes later.
    times = [s["finished_at"] for s in sorted(full, key=lambda s: len(s["response"]))]
    assert None not in times and times == sorted(times)
    lengths = sorted({len(s["response"]) for s in full})
    assert len(lengths) > 1  # samples end at different times: a cut leaves some unfinished
    # cut once every sample of length <= the middle finishing step is done
    middle = lengths[(len(lengths) - 1) // 2]
    stop_after = sum(len(s["response"]) <= middle for s in full)

    cut = generate(model, tok, prompts, n, keys=keys, stop_after=stop_after, **kw)
    done = [s for s in cut if s["finished"]]
    cut_off = [s for s in cut if not s["finished"]]
    assert len(done) == stop_after and cut_off
    assert all(len(s["response"]) == middle for s in cut_off)
    assert all(s["stop_reason"] == "cut" and s["finished_at"] is None for s in cut_off)
    for s in done:
        assert s["response"] == full[s["prompt_index"] * n + s["sample_index"]]["response"]

    # continue the cut samples elsewhere, in a different batch order
    cut_off.reverse()
    cont = generate(
        model,
        tok,
        [prompts[s["prompt_index"]] for s in cut_off],
        1,
        prefixes=[s["response"] for s in cut_off],
        keys=[keys[s["prompt_index"]] for s in cut_off],
        sample_indices=[s["sample_index"] for s in cut_off],
        **kw,
    )
    for s, c in zip(cut_off, cont, strict=True):
        ref = full[s["prompt_index"] * n + s["sample_index"]]
        assert c["response"][: len(s["response"])] == s["response"]
        assert c["response"] == ref["response"] and c["finished"]
        delta = max(abs(a - b) for a, b in zip(c["logprobs"], ref["logprobs"], strict=True))
        assert delta <= 1e-5


def test_samples_do_not_depend_on_batch_composition(eos_prone):
    model, tok = eos_prone
    prompts = [tok.encode(tok.render_prompt(w)) for w in ["one", "a much longer prompt", "3"]]
    kw = dict(n=4, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=5)
    together = generate(model, tok, prompts, **kw)
    alone = generate(model, tok, [prompts[1]], keys=[1], **kw)
    assert [s["response"] for s in alone] == [s["response"] for s in together.samples[4:8]]
    other_seed = generate(model, tok, prompts, **{**kw, "seed": 6})
    assert [s["response"] for s in other_seed] != [s["response"] for s in together]
    # within a group the samples differ (they are not one sample copied n times)
    assert len({tuple(s["response"]) for s in together.samples[:4]}) > 1


def test_generation_respects_caps_and_restores_mode(tiny):
    model, tok = tiny
    model.train()
    out = generate(model, tok, [tok.encode("abc")], n=2, max_new_tokens=5, temperature=1.0, seed=0)
    assert model.training  # put back as it was
    model.eval()
    assert all(len(s["response"]) <= 5 and len(s["logprobs"]) == len(s["response"]) for s in out)
    assert generate(model, tok, [], n=2, max_new_tokens=5).samples == []
    with pytest.raises(ValueError):
        generate(model, tok, [[1, 2]], n=2, max_new_tokens=5, prefixes=[[3]])


def test_rows_merged_into_a_running_batch_finish_as_if_uncut(eos_prone):
    """A hand-off at the model level: rows cut from one session continue inside another
    session's running batch (different padding and cache width) and equal uncut ones."""
    model, tok = eos_prone
    prompts = [tok.encode(tok.render_prompt(w)) for w in ["hi", "a much longer prompt"]]
    keys = [prompt_key(f"p{i}") for i in range(2)]
    n, cap, seed = 4, 24, 3
    full = generate(model, tok, prompts, n, cap, seed=seed, keys=keys)
    first = GenerationSession(model, tok, cap, seed=seed)
    first.add([Row(prompts[0], keys[0], j, tag=(0, j)) for j in range(n)])
    for _ in range(3):
        first.step()
    moved = [Row(r.prompt, r.key, r.index, tag=r.tag, response=list(r.response))
             for r in first.unfinished()]
    first.release()
    assert moved and first.live == 0
    second = GenerationSession(model, tok, cap, seed=seed)
    own = [Row(prompts[1], keys[1], j, tag=(1, j)) for j in range(n)]
    second.add(own)
    second.step()  # already running when the hand-off arrives
    done = second.add(moved)
    while second.live:
        done += second.step()
    assert {r.tag for r in done} >= {r.tag for r in moved}
    for row in moved + own:
        p, j = row.tag
        ref = full[p * n + j]
        assert row.response == ref["response"] and row.reason is not None
        assert max(abs(a - b) for a, b in zip(row.logprobs[row.prefix_len:],
                                              ref["logprobs"][row.prefix_len:],
                                              strict=True)) <= 1e-5


def test_session_row_caps_and_prefill_dedup(tiny):
    model, tok = tiny
    prompt = tok.encode("abc")
    shared = GenerationSession(model, tok, 6, seed=0)
    shared.add([Row(prompt, 1, j, max_new=2 if j == 0 else None) for j in range(3)])
    while shared.live:
        shared.step()
    assert len(shared.rows[0].response) <= 2 and all(len(r.response) <= 6 for r in shared.rows)
    assert shared.prefill_tokens_saved == 2 * len(prompt)
    apart = GenerationSession(model, tok, 6, seed=0, dedup_prefill=False)
    apart.add([Row(prompt, 1, j, max_new=2 if j == 0 else None) for j in range(3)])
    while apart.live:
        apart.step()
    assert apart.prefill_tokens_saved == 0
    assert [r.response for r in apart.rows] == [r.response for r in shared.rows]
