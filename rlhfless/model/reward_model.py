"""A reward model: a sequence classifier with one label, scored over groups that share a prompt.

Each group's prompt runs once; its keys/values serve every response of the group
(`grouped_forward(final=True)`), and the classifier head reads the state after each
response's last real token, as the model's own forward reads its last non-padding token.
The text is tokenised by the reward model's tokenizer (its chat template when it has one),
so the policy and the reward model may use different vocabularies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfless.model.loading import _DTYPES, ModelLoadError
from rlhfless.model.logprobs import grouped_forward
from rlhfless.model.reward_config import (
    DEFAULT_TOKEN_BUDGET,
    FIELD,
    reward_model_problem,
)
from rlhfless.model.tokenizer import _plain_chat


def load_reward_model(path: str | os.PathLike, dtype: str = "float32"
                      ) -> tuple[torch.nn.Module, Any]:
    """(classifier in eval mode on CPU, its transformers tokenizer), from a local directory
    only; every problem is a ModelLoadError naming `spec.reward.model.path`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    problem = reward_model_problem(path)
    if problem is not None:
        raise ModelLoadError(f"{FIELD}: {problem}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), local_files_only=True, dtype=_DTYPES[dtype])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{FIELD}: cannot load the reward model from {path}: "
                             f"{exc}") from exc
    # A causal decoder's classifier (`score`) reads the last token's state; an encoder's
    # (`classifier`, BERT-like) reads a pooled first token and cannot share a prefix.
    if not isinstance(getattr(model, "score", None), torch.nn.Module):
        raise ModelLoadError(
            f"{FIELD}: {Path(path).name} is a {type(model).__name__}; the scorer needs a "
            "causal decoder whose classifier head (`score`) reads the last token "
            "(e.g. LlamaForSequenceClassification, Qwen2ForSequenceClassification)")
    return model.eval(), tokenizer


@dataclass
class Encoded:
    prompt: list[int]
    responses: list[list[int]]


class RewardModel:
    """Scores (prompt, response) texts with a loaded classifier and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *,
                 system_prompt: str | None = None,
                 token_budget: int = DEFAULT_TOKEN_BUDGET):
        self.model = model
        self.hf = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.system_prompt = system_prompt
        self.token_budget = token_budget

    # -- text to tokens ------------------------------------------------------------------
    def _messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt \
            else []
        return [*system, {"role": "user", "content": prompt}]

    def encode(self, prompt: str, responses: Sequence[str]) -> Encoded:
        """The prompt as the model's chat template renders it (with the assistant's turn
        opened), and each response as the rest of the conversation: what the template adds
        after the prompt when the assistant's reply is in it (its end-of-turn tokens
        included). A tokenizer without a template: the plain `User: ...\\nAssistant:` form
        and the response text after it."""
        messages = self._messages(prompt)
        if not self.templated:
            text = _plain_chat(messages)
            ids = list(self.hf(text, add_special_tokens=True)["input_ids"])
            return Encoded(ids, [self._ids(r) for r in responses])
        head = self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=True)
        out = []
        for response in responses:
            whole = self.hf.apply_chat_template(
                [*messages, {"role": "assistant", "content": response}], tokenize=False)
            # A template that rewrites earlier turns once a reply follows: the reply alone.
            out.append(self._ids(whole[len(head):] if whole.startswith(head) else response))
        return Encoded(self._ids(head), out)

    def _ids(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    # -- scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def score_tokens(self, prompts: Sequence[Sequence[int]],
                     groups: Sequence[Sequence[Sequence[int]]],
                     between: Callable[[], None] | None = None) -> list[list[float]]:
        """One reward per response: the classifier's logit after the response's last token,
        every prompt run once per part of at most `token_budget` padded tokens (`between`
        runs before each part: a cancelled request raises there)."""
        out: list[list[float]] = [[] for _ in groups]
        for part in _parts(prompts, groups, self.token_budget):
            if between is not None:
                between()
            hidden = grouped_forward(
                self.model, [prompts[g] for g, _, _ in part],
                [groups[g][lo:hi] for g, lo, hi in part],
                logprobs=False, hidden=True, final=True).hidden
            assert hidden is not None
            last = torch.stack([h[-1] for grp in hidden for h in grp])
            scores = self.model.score(last).float()[:, 0].tolist()
            k = 0
            for g, lo, hi in part:
                out[g].extend(scores[k:k + hi - lo])
                k += hi - lo
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              between: Callable[[], None] | None = None) -> list[float]:
        """One reward per (prompt, response); items that share a prompt are one group."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        order: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            order.setdefault(prompt, []).append(i)
        encoded = [self.encode(p, [responses[i] for i in idx]) for p, idx in order.items()]
        scores = self.score_tokens([e.prompt for e in encoded], [e.responses for e in encoded],
                                   between)
        rewards = [0.0] * len(prompts)
        for idx, group in zip(order.values(), scores, strict=True):
            for i, value in zip(idx, group, strict=True):
                rewards[i] = value
        return rewards


def _parts(prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[Sequence[int]]],
           budget: int) -> list[list[tuple[int, int, int]]]:
    """(group, first, end) slices packed into forwards of at most `budget` padded tokens,
    rows × the longest prompt + response (a lone row above it still runs, alone)."""
    parts: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    rows = width = 0
    for g, group in enumerate(groups):
        first = 0
        for j, response in enumerate(group):
            w = len(prompts[g]) + len(response) + 1
            if rows and (rows + 1) * max(width, w) > budget:
                if first < j:
                    current.append((g, first, j))
                parts.append(current)
                current, rows, width, first = [], 0, 0, j
            rows, width = rows + 1, max(width, w)
        if first < len(group):
            current.append((g, first, len(group)))
    if current:
        parts.append(current)
    return parts
