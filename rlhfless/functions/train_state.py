"""What the trainer keeps between requests, in the weight store rather than in memory.

A trainer instance may scale to zero between steps, so the critic weights ("critic" part of
a version) and the optimizer state (`optim/v{n}.pt`, written before the version is
published) live next to the policy weights; any fresh instance resumes exactly.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from rlhfless.model.value import ValueModel
from rlhfless.weights import WeightStore, load_from_store

CRITIC_PART = "critic"


def load_critic_from_store(store: WeightStore, version: int) -> ValueModel:
    """The critic of `version`; a version without one gets a fresh critic on the base model."""
    backbone, _ = load_from_store(store, 0)
    critic = ValueModel(backbone, seed=0)
    if CRITIC_PART in store.parts(version):
        tensors, _ = store.load(version, CRITIC_PART)
        critic.load_state_dict(tensors)
    return critic.eval()


def _optim_path(store: WeightStore, version: int) -> Path:
    return store.root / "optim" / f"v{version}.pt"


def save_optimizer_state(store: WeightStore, version: int, state: dict[str, Any]) -> None:
    path = _optim_path(store, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_optimizer_state(store: WeightStore, version: int) -> dict[str, Any] | None:
    path = _optim_path(store, version)
    if not path.exists():
        return None
    return torch.load(path, weights_only=False)


def prune_optimizer_states(store: WeightStore, keep_versions: set[int]) -> None:
    folder = store.root / "optim"
    if not folder.exists():
        return
    for file in folder.glob("v*.pt"):
        if int(file.stem[1:]) not in keep_versions:
            file.unlink(missing_ok=True)
