"""Token ids a request may carry: those the model's vocabulary has.

An id outside [0, vocab_size) would index past the embedding table (an IndexError on CPU, a
device-side assert that kills the process on CUDA), so it is refused up front as a 422 that
names where it sits.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from rlhfless.functions.app import FunctionError
from rlhfless.store import WeightStore

Named = Iterable[tuple[str, Sequence[int]]]


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
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            index = next(i for i, t in enumerate(ids) if not 0 <= t < vocab_size)
            raise FunctionError(422, f"{where}[{index}]: token id {ids[index]} is outside the "
                                     f"model's vocabulary [0, {vocab_size})")


def grouped(prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[Sequence[int]]]) -> Named:
    """(field path, ids) of a scoring or training request's prompts and responses."""
    for p, ids in enumerate(prompts):
        yield f"prompts[{p}]", ids
    for g, group in enumerate(groups):
        for r, ids in enumerate(group):
            yield f"groups[{g}][{r}]", ids
