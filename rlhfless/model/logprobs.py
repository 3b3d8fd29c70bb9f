"""Log-probs of responses under a causal LM: naive, and with a shared (deduplicated) prefix.

Shared prefix: the prompts of a batch run once (left-padded), their KV cache is gathered
over the G responses of each group, and only the response tokens run on top of it. The
result equals the naive per-sample computation to fp32 rounding; it is differentiable (the
trainer backprops through it: gradients of the G responses flow into the one prompt pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from rlhfless.model.batching import (
    check_length,
    left_pad,
    model_device,
    right_pad,
    token_logprobs,
)
from rlhfless.model.checkpointing import checkpointing_active


@dataclass
class GroupedOutput:
    """Per group and response: log-probs [R] and/or the hidden states [R, H] that predict
    each response token (state after the previous token; a value head reads these)."""

    logprobs: list[list[torch.Tensor]] | None
    hidden: list[list[torch.Tensor]] | None
    prefill_tokens_saved: int


class GroupedLogprobs(list):
    """`list[list[Tensor]]` of log-probs, plus what the shared-prefix pass counted."""

    prefill_tokens_saved: int = 0
    values: list[list[torch.Tensor]] | None = None


def sequence_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
) -> list[torch.Tensor]:
    """Naive reference: one full forward of prompt + response per sample, no padding."""
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses must have the same length")
    device = model_device(model)
    out: list[torch.Tensor] = []
    for prompt, response in zip(prompts, responses, strict=True):
        if not prompt:
            raise ValueError("empty prompt")
        if not response:
            out.append(torch.zeros(0, device=device))
            continue
        check_length(model, len(prompt) + len(response))
        ids = torch.tensor([list(prompt) + list(response)], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        out.append(token_logprobs(logits, ids[0, len(prompt) :]))
    return out


def _cache_holds(cache: DynamicCache, layers: int, width: int) -> bool:
    """Every layer kept the prompt's keys/values (a checkpointed layer drops them)."""
    try:
        return all(cache.get_seq_length(i) == width for i in range(layers))
    except (IndexError, KeyError):
        return False


def _split(mat: torch.Tensor, lengths: list[int], rows: list[tuple[int, int]], n_groups: int):
    """Rows of a [N, R, ...] tensor cut to their lengths, regrouped per prompt."""
    grouped: list[list[torch.Tensor]] = [[] for _ in range(n_groups)]
    for row, ((g, _), length) in enumerate(zip(rows, lengths, strict=True)):
        grouped[g].append(mat[row, :length])
    return grouped


def _shared_prefix_hidden(model, prompts, responses, prompt_of, device, final=False):
    """Hidden states [N, R, H] predicting each response token, prompts run once (`final`:
    [N, R + 1, H], also the state after each response's last token)."""
    backbone = model.base_model
    pad = 0  # any id: padded positions are masked out
    p_ids, p_mask, p_pos = left_pad(prompts, pad, device)
    cache = DynamicCache(config=model.config)
    h_prompt = backbone(
        input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    if not _cache_holds(cache, model.config.num_hidden_layers, p_ids.shape[1]):
        # A layer dropped the cache although checkpointing looked off (a transformers
        # we do not know): the responses would not see their prompt. Never score that way.
        return None
    index = torch.tensor(prompt_of, dtype=torch.long, device=device)
    last = h_prompt[:, -1][index]  # left padding: the last column is every prompt's last token
    r_ids, r_mask = right_pad(responses, pad, device)
    width = r_ids.shape[1]
    # The response's final token predicts nothing we score: run only tokens 0..R-2, unless
    # the state after it is wanted (`final`: what a sequence classifier scores). At least one
    # column runs (its output unused but in the graph): the ranks of a sharded model must all
    # make the same calls, whatever their responses' lengths.
    wanted = width if final else width - 1
    keep = max(wanted, 1)
    r_ids, r_mask = r_ids[:, :keep], r_mask[:, :keep]
    if final and r_ids.shape[1] == 0:
        return last.unsqueeze(1)
    cache.batch_select_indices(index)  # gather = expand each prompt's cache over its group
    lengths = p_mask.sum(-1)[index]
    positions = lengths.unsqueeze(1) + torch.arange(r_ids.shape[1], device=device)
    h_resp = backbone(
        input_ids=r_ids,
        attention_mask=torch.cat([p_mask[index], r_mask], dim=1),
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    return torch.cat([last.unsqueeze(1), h_resp[:, : max(wanted, 0)]], dim=1)


def _full_sequence_hidden(model, prompts, responses, prompt_of, device, final=False):
    """Same result as `_shared_prefix_hidden`, without a cache (prompt repeated per row)."""
    seqs = [list(prompts[p]) + list(r) for p, r in zip(prompt_of, responses, strict=True)]
    ids, mask = right_pad(seqs, 0, device)
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    width = max(len(r) for r in responses) + int(final)
    starts = torch.tensor([len(prompts[p]) - 1 for p in prompt_of], device=device)
    cols = (starts.unsqueeze(1) + torch.arange(width, device=device)).clamp(max=ids.shape[1] - 1)
    return hidden.gather(1, cols.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def grouped_forward(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    groups: Sequence[Sequence[Sequence[int]]],
    *,
    logprobs: bool = True,
    hidden: bool = False,
    final: bool = False,
) -> GroupedOutput:
    """Score `groups[i]` (G_i responses) after `prompts[i]`, each prompt computed once.

    `final` (hidden states only) adds the state after each response's last token: a
    response of R tokens gets R + 1 states, the last one what a sequence classifier reads
    (an empty response: the prompt's last state)."""
    if len(prompts) != len(groups):
        raise ValueError("need one group of responses per prompt")
    if final and logprobs:
        raise ValueError("final states predict no response token: ask for hidden only")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    rows = [(g, j) for g, group in enumerate(groups) for j in range(len(group))]
    responses = [list(groups[g][j]) for g, j in rows]
    lengths = [len(r) for r in responses]
    device = model_device(model)
    scored = [(g, len(groups[g][j])) for g, j in rows if groups[g][j]]
    if not scored and not final:
        empty = [[torch.zeros(0, device=device) for _ in group] for group in groups]
        return GroupedOutput(empty if logprobs else None, empty if hidden else None, 0)
    for g, n in scored:
        check_length(model, len(prompts[g]) + n)

    # Rows with empty responses still join the batch (they cost one padded column, no more).
    prompt_of = [g for g, _ in rows]
    # Checkpointed layers drop the KV cache: the prompt's keys/values would be lost.
    states = None
    if not checkpointing_active(model):
        states = _shared_prefix_hidden(model, prompts, responses, prompt_of, device, final)
    shared = states is not None
    if states is None:
        states = _full_sequence_hidden(model, prompts, responses, prompt_of, device, final)
    saved = sum(len(prompts[g]) * (len(grp) - 1) for g, grp in enumerate(groups) if grp)

    out_lp = None
    if logprobs:
        r_ids, _ = right_pad(responses, 0, device)
        logits = model.get_output_embeddings()(states)
        out_lp = _split(token_logprobs(logits, r_ids), lengths, rows, len(groups))
    out_h = None
    if hidden:
        out_h = _split(states, [n + int(final) for n in lengths], rows, len(groups))
    return GroupedOutput(out_lp, out_h, saved if shared else 0)


def grouped_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    groups: Sequence[Sequence[Sequence[int]]],
    with_values_head: torch.nn.Module | None = None,
) -> GroupedLogprobs:
    """Shared-prefix log-probs: `result[i][j]` is a [len(groups[i][j])] tensor.

    The returned list also carries `.prefill_tokens_saved` (prompt tokens not recomputed) and,
    when `with_values_head` (a module mapping [.., H] -> [.., 1]) is given, `.values` shaped
    like the log-probs (value of the state before each response token).
    """
    need_hidden = with_values_head is not None
    out = grouped_forward(model, prompts, groups, logprobs=True, hidden=need_hidden)
    result = GroupedLogprobs(out.logprobs or [])
    result.prefill_tokens_saved = out.prefill_tokens_saved
    if with_values_head is not None and out.hidden is not None:
        result.values = [[with_values_head(h).squeeze(-1) for h in grp] for grp in out.hidden]
    return result
