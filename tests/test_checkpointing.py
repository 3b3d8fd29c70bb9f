"""Gradient checkpointing is detected on every transformers 5.x, and the shared-prefix pass
never runs without the prompt's keys/values (that would give silently wrong gradients)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhfless.model import grouped_logprobs, load_base, sequence_logprobs
from rlhfless.model import logprobs as logprobs_module
from rlhfless.model.checkpointing import checkpointing_active, enable_checkpointing


def tiny_model() -> torch.nn.Module:
    tiny = SimpleNamespace(vocab_size=128, n_layer=2, n_embd=32, n_head=2, n_positions=64,
                           seed=0)
    return load_base(SimpleNamespace(source="tiny", path=None, gguf_file=None, tiny=tiny))[0]


BATCH = ([[5, 6, 7, 8], [9, 10]], [[[11, 12, 13], [14]], [[15, 16], [17, 18, 19, 20]]])


def flat(prompts, groups):
    return [p for p, g in zip(prompts, groups, strict=True) for _ in g], \
        [r for g in groups for r in g]


def test_detection_follows_the_layer_flags_and_the_mode():
    model = tiny_model()
    assert not checkpointing_active(model)
    enable_checkpointing(model)
    assert model.training and checkpointing_active(model)
    with torch.no_grad():  # transformers 5.20 drops the cache in train mode even without grad
        assert checkpointing_active(model)
    model.eval()
    assert not checkpointing_active(model)


def test_enable_works_with_the_older_method_name():
    calls = []

    class Older(torch.nn.Module):  # transformers <= 5.20: only gradient_checkpointing_enable
        def gradient_checkpointing_enable(self):
            calls.append("old")
            self.gradient_checkpointing = True

    module = Older()
    enable_checkpointing(module)
    assert calls == ["old"] and checkpointing_active(module)
    with pytest.raises(ValueError, match="does not support"):
        enable_checkpointing(torch.nn.Linear(2, 2))


def grads(model, prompts, groups):
    model.zero_grad()
    out = grouped_logprobs(model, prompts, groups)
    sum(x.sum() for g in out for x in g).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_dropped_cache_falls_back_to_full_sequences(monkeypatch):
    """Simulate a transformers whose checkpointing this code cannot see: the layers drop the
    cache, detection says no. The pass must notice the empty cache and score full sequences."""
    prompts, groups = BATCH
    plain = tiny_model().train()
    expected, expected_grads = grads(plain, prompts, groups)
    hidden = tiny_model()
    enable_checkpointing(hidden)
    monkeypatch.setattr(logprobs_module, "checkpointing_active", lambda model: False)
    out, got_grads = grads(hidden, prompts, groups)
    assert out.prefill_tokens_saved == 0  # the shared prefix was refused
    for a, b in zip([x for g in out for x in g], [x for g in expected for x in g], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert expected_grads.keys() == got_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4)


def test_checkpointed_scores_equal_the_naive_ones():
    prompts, groups = BATCH
    model = tiny_model()
    with torch.no_grad():
        naive = sequence_logprobs(model, *flat(prompts, groups))
    enable_checkpointing(model)
    out = grouped_logprobs(model, prompts, groups)
    assert out.prefill_tokens_saved == 0
    for a, b in zip([x for g in out for x in g], naive, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
