"""Padding utilities shared by scoring and generation (pure tensor code, no model calls)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> (ids [B,L], mask [B,L], position ids [B,L]).

    Left padding puts every sequence's last token in the last column, so one slice gives all
    next-token states. Position ids count real tokens only, so padding never shifts positions.
    """
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> (ids [B,L], mask [B,L])."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] in fp32 (the fused log_softmax beats logsumexp on CPU)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def max_positions(model: torch.nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_length(model: torch.nn.Module, length: int) -> None:
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise ValueError(f"sequence of {length} tokens exceeds the model's {limit} positions")
