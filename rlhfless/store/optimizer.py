"""The trainer's optimizer state, kept in the store next to the version it produced.

A trainer instance may scale to zero between steps, so the state after producing version n
is written as `optim/v{n}.pt` before v{n} is published; any fresh instance resumes exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhfless.store.atomic import atomic_file
from rlhfless.store.weights import WeightStore

OPTIM_DIR = "optim"


def _optim_path(store: WeightStore, version: int) -> Path:
    return store.root / OPTIM_DIR / f"v{version}.pt"


def save_optimizer_state(store: WeightStore, version: int, state: dict[str, Any]) -> None:
    with atomic_file(_optim_path(store, version)) as tmp:
        torch.save(state, tmp)


def load_optimizer_state(store: WeightStore, version: int) -> dict[str, Any] | None:
    path = _optim_path(store, version)
    if not path.exists():
        return None
    return torch.load(path, weights_only=False)


def prune_optimizer_states(store: WeightStore, keep_versions: set[int]) -> None:
    folder = store.root / OPTIM_DIR
    if not folder.exists():
        return
    for file in folder.glob("v*.pt"):
        if int(file.stem[1:]) not in keep_versions:
            file.unlink(missing_ok=True)
