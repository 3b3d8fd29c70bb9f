"""Batched sampling with a KV cache, reproducible per sample (so cut samples can migrate).

Every random draw comes from `rlhfless.model.sampler`, a pure function of (seed, prompt key,
sample index, token position): a sample gets the same tokens whatever else is in the batch,
and a sample cut after k tokens and continued elsewhere (prompt + partial response as
`prefixes`) gets the tokens it would have got uncut. Tokens are exact; log-probs of a
continued sample equal the uncut ones to fp32 rounding (the prefix's KV states are
recomputed in one pass instead of token by token).

Each prompt's KV cache is computed once and gathered over its n samples (deduplicated
prefill); `GenerationResult.prefill_tokens_saved` counts the prompt tokens not recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from rlhfless.model.batching import check_length, left_pad, model_device, right_pad
from rlhfless.model.sampler import choose_tokens, sample_uniform
from rlhfless.model.tokenizer import Tokenizer


class GenerationResult(list):
    """The samples (a list of dicts, prompt-major: prompt i, sample j at i*n + j) plus counts.

    Each sample: prompt_index, sample_index, response (prefix included), logprobs (one per
    response token: log softmax of the raw logits, i.e. the temperature-1 policy log-prob),
    finished, stop_reason ("eos" | "length" | "cut").
    """

    def __init__(
        self, samples: list[dict[str, Any]], prefill_tokens_saved: int = 0, steps: int = 0
    ) -> None:
        super().__init__(samples)
        self.prefill_tokens_saved = prefill_tokens_saved  # prompt tokens not recomputed
        self.steps = steps  # decode steps (forward passes after the prefill)

    @property
    def samples(self) -> list[dict[str, Any]]:
        return list(self)


class _Rows:
    """Bookkeeping of the rows still decoding (their cache rows, masks and positions)."""

    def __init__(self, ids: list[int], mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.ids = ids  # output sample index of each live row
        self.mask = mask  # [A, cache columns] 1 = real token
        self.positions = positions  # [A] position id of the next token

    def keep(self, keep: list[int], cache: DynamicCache) -> torch.Tensor:
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        cache.batch_select_indices(index)
        self.ids = [self.ids[k] for k in keep]
        self.mask, self.positions = self.mask[index], self.positions[index]
        return index


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tok: Tokenizer,
    prompts: Sequence[Sequence[int]],
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    prefixes: Sequence[Sequence[int]] | None = None,
    stop_after: int | None = None,
    keys: Sequence[int] | None = None,
    sample_indices: Sequence[int] | None = None,
    on_step: Callable[[], None] | None = None,
) -> GenerationResult:
    """Sample n responses per prompt.

    prefixes: partial responses to continue, one per output (len(prompts) * n, prompt-major).
      `max_new_tokens` caps the whole response, prefix included, so a continued sample stops
      where the uncut one would have.
    stop_after: return as soon as this many outputs are finished; the rest come back with
      their partial response and finished=False (stop_reason "cut").
    keys: RNG key per prompt (default: its index); pass stable keys (`prompt_key(id)`) when
      samples may be continued in another call.
    sample_indices: RNG sample index per output (default j for the j-th sample of a prompt);
      a continued sample passes its original index.
    on_step: called before every decode step; it may raise to abandon the generation (the
      functions do when their caller disconnects).
    """
    total = len(prompts) * n
    if n < 1:
        raise ValueError("n must be >= 1")
    if not prompts:
        return GenerationResult([])
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    prefixes = [list(p) for p in prefixes] if prefixes is not None else [[] for _ in range(total)]
    keys = list(keys) if keys is not None else list(range(len(prompts)))
    default_ids = [j for _ in prompts for j in range(n)]
    sample_ids = list(sample_indices) if sample_indices is not None else default_ids
    if len(prefixes) != total or len(sample_ids) != total or len(keys) != len(prompts):
        raise ValueError("prefixes/sample_indices need len(prompts)*n entries, keys len(prompts)")
    for r, prefix in enumerate(prefixes):
        check_length(model, len(prompts[r // n]) + max(max_new_tokens, len(prefix)))

    eos = tok.eos_token_id
    responses = [list(p) for p in prefixes]
    logprobs: list[list[float]] = [[] for _ in range(total)]
    reasons: list[str | None] = [None] * total
    prompt_of = [r // n for r in range(total)]
    was_training = model.training
    model.eval()
    try:
        logits, rows, cache = _prefill(model, prompts, prefixes, prompt_of, logprobs)
        for r in range(total):
            reasons[r] = _stop_reason(responses[r], eos, max_new_tokens)
        steps, tokens = 0, None
        while True:
            live = [a for a, r in enumerate(rows.ids) if reasons[r] is None]
            done = sum(reason is not None for reason in reasons)
            if not live or (stop_after is not None and done >= stop_after):
                break
            if on_step is not None:
                on_step()
            if len(live) < len(rows.ids):  # drop finished rows before the next forward
                index = rows.keep(live, cache)
                logits = logits[index]
                tokens = tokens[index] if tokens is not None else None
            if tokens is not None:
                logits = _decode_step(model, cache, rows, tokens)
            uniforms = torch.tensor(
                [
                    sample_uniform(seed, keys[prompt_of[r]], sample_ids[r], len(responses[r]))
                    for r in rows.ids
                ]
            )
            tokens = choose_tokens(logits, uniforms.to(logits.device), temperature, top_p)
            chosen_lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None])
            for r, token, lp in zip(
                rows.ids, tokens.tolist(), chosen_lp[:, 0].tolist(), strict=True
            ):
                responses[r].append(token)
                logprobs[r].append(lp)
                reasons[r] = _stop_reason(responses[r], eos, max_new_tokens)
            steps += 1
    finally:
        model.train(was_training)

    samples = [
        {
            "prompt_index": prompt_of[r],
            "sample_index": sample_ids[r],
            "response": responses[r],
            "logprobs": logprobs[r],
            "finished": reasons[r] is not None,
            "stop_reason": reasons[r] or "cut",
        }
        for r in range(total)
    ]
    saved = sum(len(p) for p in prompts) * (n - 1)
    return GenerationResult(samples, prefill_tokens_saved=saved, steps=steps)


def _stop_reason(response: list[int], eos: int, max_new_tokens: int) -> str | None:
    if response and response[-1] == eos:
        return "eos"
    if len(response) >= max_new_tokens:
        return "length"
    return None


def _prefill(model, prompts, prefixes, prompt_of, logprobs):
    """Run each prompt once, gather its cache over its samples, then run the prefixes.

    Fills `logprobs` for prefix tokens and returns (next-token logits [N, V], rows, cache).
    """
    device = model_device(model)
    p_ids, p_mask, p_pos = left_pad(prompts, 0, device)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=p_ids,
        attention_mask=p_mask,
        position_ids=p_pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    index = torch.tensor(prompt_of, dtype=torch.long, device=device)
    cache.batch_select_indices(index)
    mask = p_mask[index]
    positions = p_mask.sum(-1)[index]
    logits = out.logits[:, -1][index]
    lengths = [len(p) for p in prefixes]
    if max(lengths) > 0:
        f_ids, f_mask = right_pad(prefixes, 0, device)
        mask = torch.cat([mask, f_mask], dim=1)
        f_pos = positions.unsqueeze(1) + torch.arange(f_ids.shape[1], device=device)
        f_logits = model(
            input_ids=f_ids,
            attention_mask=mask,
            position_ids=f_pos,
            past_key_values=cache,
            use_cache=True,
        ).logits
        # the state predicting prefix token t: prompt's last for t = 0, prefix token t-1 after
        pred = torch.cat([logits.unsqueeze(1), f_logits[:, :-1]], dim=1)
        lp = torch.log_softmax(pred.float(), dim=-1).gather(-1, f_ids.unsqueeze(-1))[..., 0]
        for r, k in enumerate(lengths):
            logprobs[r].extend(lp[r, :k].tolist())
            if k:
                logits[r] = f_logits[r, k - 1]
        positions = positions + torch.tensor(lengths, device=device)
    return logits, _Rows(list(range(len(prefixes))), mask, positions), cache


def _decode_step(model, cache, rows: _Rows, tokens: torch.Tensor) -> torch.Tensor:
    rows.mask = torch.cat([rows.mask, torch.ones_like(rows.mask[:, :1])], dim=1)
    out = model(
        input_ids=tokens.unsqueeze(1),
        attention_mask=rows.mask,
        position_ids=rows.positions.unsqueeze(1),
        past_key_values=cache,
        use_cache=True,
    )
    rows.positions = rows.positions + 1
    return out.logits[:, -1]
