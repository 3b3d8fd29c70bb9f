"""Batched sampling with a KV cache, reproducible per sample (so cut samples can migrate).

Every random draw comes from `rlhfless.model.sampler`, a pure function of (seed, prompt key,
sample index, token position): a sample gets the same tokens whatever else is in the batch,
and a sample cut after k tokens and continued elsewhere (prompt + partial response as
`prefixes`) gets the tokens it would have got uncut. Tokens are exact; log-probs of a
continued sample equal the uncut ones to fp32 rounding (the prefix's KV states are
recomputed in one pass instead of token by token).

Each prompt's KV cache is computed once and gathered over its n samples (deduplicated
prefill); `GenerationResult.prefill_tokens_saved` counts the prompt tokens not recomputed.

`GenerationSession` is the incremental form the actor runs: one decode step at a time,
finished rows reported as they finish, new rows (a hand-off's continuations) prefilled and
merged into the running batch between steps, and the unfinished rows handed back on a cut.
`generate` is the one-call form on top of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    finished, stop_reason ("eos" | "length" | "cut"), finished_at (Unix seconds; None if cut).
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


@dataclass
class Row:
    """One sample being generated: its identity, its random stream and its progress."""

    prompt: list[int]
    key: int  # RNG key of its prompt (`prompt_key(id)` for samples that may migrate)
    index: int  # RNG sample index
    tag: Any = None  # the caller's handle for this row
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reason: str | None = None  # "eos" | "length" once finished
    finished_at: float | None = None  # when it finished (Unix seconds): the rollout's tail
    prefix_len: int = 0
    max_new: int | None = None  # this row's own length cap (the session's still applies)


class _Rows:
    """Bookkeeping of the rows in the batch (their cache rows, masks and positions)."""

    def __init__(self, ids: list[int], mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.ids = ids  # session row index of each batch row
        self.mask = mask  # [A, cache columns] 1 = real token
        self.positions = positions  # [A] position id of the next token

    def keep(self, keep: list[int], cache: DynamicCache) -> torch.Tensor:
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        cache.batch_select_indices(index)
        self.ids = [self.ids[k] for k in keep]
        self.mask, self.positions = self.mask[index], self.positions[index]
        return index


def _left_pad_columns(x: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    if columns == 0:
        return x
    shape = list(x.shape)
    shape[dim] = columns
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _merge_batches(cache: DynamicCache, rows: _Rows, other: DynamicCache,
                   other_rows: _Rows) -> None:
    """Append `other`'s rows to `cache`/`rows` (in place). The shorter side is padded on
    the left with masked-out columns, so every row keeps its own positions and tokens."""
    width_a, width_b = rows.mask.shape[1], other_rows.mask.shape[1]
    width = max(width_a, width_b)
    for layer, extra in zip(cache.layers, other.layers, strict=True):
        # [batch, heads, columns, head dim]: columns are dim -2
        layer.keys = torch.cat([_left_pad_columns(layer.keys, width - width_a, -2),
                                _left_pad_columns(extra.keys, width - width_b, -2)], dim=0)
        layer.values = torch.cat([_left_pad_columns(layer.values, width - width_a, -2),
                                  _left_pad_columns(extra.values, width - width_b, -2)], dim=0)
    rows.mask = torch.cat([_left_pad_columns(rows.mask, width - width_a, 1),
                           _left_pad_columns(other_rows.mask, width - width_b, 1)], dim=0)
    rows.positions = torch.cat([rows.positions, other_rows.positions])
    rows.ids = rows.ids + other_rows.ids


class GenerationSession:
    """A running batch of samples, advanced one token per `step()`.

    `add` prefills new rows (each distinct prompt once, its KV cache gathered over its rows;
    a prefix, when given, is scored and continued) and merges them into the batch; `step`
    samples one token for every row and returns the rows that finished; `unfinished` lists
    the rows still going (a cut hands them on, prompt + partial response).
    """

    def __init__(self, model: torch.nn.Module, tok: Tokenizer, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 dedup_prefill: bool = True) -> None:
        self.model, self.eos = model, tok.eos_token_id
        self.dedup_prefill = dedup_prefill
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.seed = seed
        self.rows: list[Row] = []
        self.steps = 0  # decode steps (batched forward passes after a prefill)
        self.prefill_tokens_saved = 0
        self.prompt_tokens = 0
        self._batch: _Rows | None = None
        self._cache: DynamicCache | None = None
        self._logits: torch.Tensor | None = None  # next-token logits of each batch row

    def _cap(self, row: Row) -> int:
        return self.max_new_tokens if row.max_new is None else min(row.max_new,
                                                                   self.max_new_tokens)

    @property
    def live(self) -> int:
        return len(self._batch.ids) if self._batch is not None else 0

    def check(self, prompt: Sequence[int], prefix: Sequence[int] = ()) -> None:
        """Refuse (ValueError) a row the model cannot hold."""
        if not prompt:
            raise ValueError("empty prompt")
        check_length(self.model, len(prompt) + max(self.max_new_tokens, len(prefix)))

    @torch.no_grad()
    def add(self, rows: Sequence[Row]) -> list[Row]:
        """Prefill `rows` (their `response` holds the prefix to continue) into the batch;
        returns those already finished by their prefix."""
        if not rows:
            return []
        for row in rows:
            self.check(row.prompt, row.response)
        prompts: list[list[int]] = []
        seen: dict[tuple[int, ...], int] = {}
        prompt_of = []
        for k, row in enumerate(rows):
            # without dedup every row prefills its own copy of the prompt (the baseline)
            ident = tuple(row.prompt) if self.dedup_prefill else (k,)
            if ident not in seen:
                seen[ident] = len(prompts)
                prompts.append(list(row.prompt))
            prompt_of.append(seen[ident])
        first = len(self.rows)
        for row in rows:
            row.prefix_len = len(row.response)
            row.logprobs = []
            self.rows.append(row)
        was_training = self.model.training
        self.model.eval()
        try:
            logits, batch, cache = _prefill(self.model, prompts, [r.response for r in rows],
                                            prompt_of, [r.logprobs for r in rows])
        finally:
            self.model.train(was_training)
        self.prompt_tokens += sum(len(p) for p in prompts)
        self.prefill_tokens_saved += sum(len(r.prompt) for r in rows) - sum(map(len, prompts))
        batch.ids = [first + i for i in batch.ids]
        done = []
        now = time.time()
        for row in rows:
            row.reason = _stop_reason(row.response, self.eos, self._cap(row))
            if row.reason is not None:
                row.finished_at = now
                done.append(row)
        keep = [k for k, r in enumerate(batch.ids) if self.rows[r].reason is None]
        if len(keep) < len(batch.ids):
            index = batch.keep(keep, cache)
            logits = logits[index]
        if not keep:
            return done
        if self._batch is None or self._cache is None or self._logits is None:
            self._batch, self._cache, self._logits = batch, cache, logits
        else:
            _merge_batches(self._cache, self._batch, cache, batch)
            self._logits = torch.cat([self._logits, logits], dim=0)
        return done

    @torch.no_grad()
    def step(self) -> list[Row]:
        """One token for every row in the batch; returns the rows that finished."""
        if self._batch is None or self._logits is None or self._cache is None:
            return []
        batch, logits = self._batch, self._logits
        live = [self.rows[r] for r in batch.ids]
        uniforms = torch.tensor([
            sample_uniform(self.seed, row.key, row.index, len(row.response)) for row in live
        ])
        tokens = choose_tokens(logits, uniforms.to(logits.device), self.temperature,
                               self.top_p)
        chosen_lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None])
        done = []
        now = time.time()
        for row, token, lp in zip(live, tokens.tolist(), chosen_lp[:, 0].tolist(),
                                  strict=True):
            row.response.append(token)
            row.logprobs.append(lp)
            row.reason = _stop_reason(row.response, self.eos, self._cap(row))
            if row.reason is not None:
                row.finished_at = now
                done.append(row)
        keep = [k for k, row in enumerate(live) if row.reason is None]
        if not keep:
            self._batch = self._cache = self._logits = None
            return done
        if len(keep) < len(live):
            index = batch.keep(keep, self._cache)
            tokens = tokens[index]
        was_training = self.model.training
        self.model.eval()
        try:
            self._logits = _decode_step(self.model, self._cache, batch, tokens)
        finally:
            self.model.train(was_training)
        self.steps += 1
        return done

    def unfinished(self) -> list[Row]:
        """The rows still in the batch, in batch order."""
        return [self.rows[r] for r in self._batch.ids] if self._batch is not None else []

    def release(self) -> None:
        """Drop the batch (a cut): its rows are someone else's now."""
        self._batch = self._cache = self._logits = None


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
    prefixes = [list(p) for p in prefixes] if prefixes is not None else [[] for _ in range(total)]
    keys = list(keys) if keys is not None else list(range(len(prompts)))
    default_ids = [j for _ in prompts for j in range(n)]
    sample_ids = list(sample_indices) if sample_indices is not None else default_ids
    if len(prefixes) != total or len(sample_ids) != total or len(keys) != len(prompts):
        raise ValueError("prefixes/sample_indices need len(prompts)*n entries, keys len(prompts)")
    session = GenerationSession(model, tok, max_new_tokens, temperature, top_p, seed)
    rows = [Row(prompt=list(prompts[r // n]), key=keys[r // n], index=sample_ids[r],
                tag=r, response=prefixes[r]) for r in range(total)]
    done = len(session.add(rows))
    while session.live and (stop_after is None or done < stop_after):
        if on_step is not None:
            on_step()
        done += len(session.step())
    samples = [
        {
            "prompt_index": r // n,
            "sample_index": row.index,
            "response": row.response,
            "logprobs": row.logprobs,
            "finished": row.reason is not None,
            "stop_reason": row.reason or "cut",
            "finished_at": row.finished_at,
        }
        for r, row in enumerate(rows)
    ]
    return GenerationResult(samples, prefill_tokens_saved=session.prefill_tokens_saved,
                            steps=session.steps)


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
