"""Token ids a request may carry: those the model's vocabulary has.

An id outside [0, vocab_size) would index past the embedding table (an IndexError on CPU, a
device-side assert that kills the process on CUDA), so it is refused up front as a 422 that
names where it sits.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np

from rlhfless.functions.app import FunctionError
from rlhfless.store import WeightStore

Ids = Sequence[int] | np.ndarray
Named = Iterable[tuple[str, Ids]]


class Vocabulary:
    """The vocabulary size of the store's base model, read on first use (the base may be
    materialised after the function started)."""

    def __init__(self, store: WeightStore):
        self.store = store
        self._size: int | None = None

    @property
    def size(self) -> int | None:
        if self._size is None:
            try:
                config = json.loads((self.store.base_dir / "config.json").read_text())
                self._size = int(config["vocab_size"])
            except (OSError, ValueError, KeyError, TypeError):
                return None  # no base yet: the weights-version check refuses the request
        return self._size

    def check(self, named: Named) -> None:
        size = self.size
        if size is not None:
            check_token_ids(named, size)


def check_token_ids(named: Named, vocab_size: int) -> None:
    for where, ids in named:
        arr = np.asarray(ids)
        if arr.size == 0:
            continue
        bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
        if bad.size:
            index = int(bad[0])
            raise FunctionError(422, f"{where}[{index}]: token id {int(arr[index])} is outside "
                                     f"the model's vocabulary [0, {vocab_size})")


def prompts(items: Iterable[object], field: str = "prompts") -> Named:
    """(field path, ids) of rollout prompts: each prompt's ids and its partial responses."""
    for p, prompt in enumerate(items):
        yield f"{field}[{p}].prompt_ids", prompt.prompt_ids  # type: ignore[attr-defined]
        for i, prefix in enumerate(prompt.prefixes or []):  # type: ignore[attr-defined]
            yield f"{field}[{p}].prefixes[{i}]", prefix


def group(prompt_ids: Ids, responses: Sequence[Ids], field: str = "group") -> Named:
    """(field path, ids) of one scored group: its prompt and each response."""
    yield f"{field}.prompt_ids", prompt_ids
    for r, ids in enumerate(responses):
        yield f"{field}.responses[{r}]", ids
