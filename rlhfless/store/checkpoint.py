"""The driver's checkpoint: one JSON file replaced atomically after each recorded step.

Weights live in the weight store; the checkpoint says which version is current and carries the
scheduler state (length predictor, profile), so a resumed run plans exactly as it would have.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhfless.store.atomic import write_json_atomic

CHECKPOINT_FILE = "checkpoint.json"


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    step: int = 0
    weights_version: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)
    gpu_seconds_total: float = 0.0


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    path = Path(run_dir) / CHECKPOINT_FILE
    write_json_atomic(path, asdict(checkpoint))
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        return Checkpoint(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid checkpoint: {exc}") from None
