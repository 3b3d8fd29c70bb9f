"""The project's one random-number source for sampling: a counter-based hash.

Every draw is a pure function of (seed, prompt key, sample index, token position), so a
sample gets the same tokens whatever else is in its batch, and a sample cut after k tokens
and continued elsewhere draws exactly what it would have drawn uncut. The transformers
engine calls the scalar form, the vLLM logits processor the vectorised numpy twin; both
give identical values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def sample_uniform(seed: int, key: int, sample: int, position: int) -> float:
    """The uniform in [0, 1) that picks token `position` of sample `sample` of prompt `key`.

    A counter-based hash instead of a stateful generator: no state to carry across a cut.
    """
    h = 0
    for value in (seed, key, sample, position):
        h = splitmix64(h ^ (value & MASK64))
    return (h >> 11) * 2.0**-53


def prompt_key(prompt_id: str) -> int:
    """Stable 63-bit RNG key for a prompt id (use it as `keys` when samples may migrate)."""
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") >> 1


def splitmix64_np(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)  # uint64 arrays wrap modulo 2**64
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_uniforms(
    seeds: Sequence[int], keys: Sequence[int], samples: Sequence[int], positions: Sequence[int]
) -> np.ndarray:
    """`sample_uniform` over many rows at once (same values)."""
    h = np.zeros(len(keys), dtype=np.uint64)
    for column in (seeds, keys, samples, positions):
        values = np.array([int(v) & MASK64 for v in column], dtype=np.uint64)
        h = splitmix64_np(h ^ values)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53



def choose_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """Pick one token per row: greedy at temperature 0, else inverse-CDF with `uniforms`.

    Row-wise only (no cross-row reduction), so a row's choice never depends on the batch.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        # keep the smallest head whose mass reaches top_p (the first token always stays)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)
    target = uniforms.double().unsqueeze(1) * cdf[:, -1:]
    picked = (cdf < target).sum(-1).clamp(max=probs.shape[-1] - 1)
    if order is not None:
        picked = order.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
    return picked
