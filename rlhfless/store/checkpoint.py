"""The driver's checkpoint: one JSON file replaced atomically after each recorded step.

Weights live in the weight store; the checkpoint says which version is current and carries the
scheduler state (length predictor, profile), so a resumed run plans exactly as it would have.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
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


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checkpoint_errors(data: Any) -> list[str]:
    """Why a decoded checkpoint.json is malformed ("field: reason"; empty when it is not)."""
    if not isinstance(data, dict):
        return [f"(root): expected a JSON object, got {type(data).__name__}"]
    known = [f.name for f in fields(Checkpoint)]
    errors = [f"{key}: unknown field" for key in data if key not in known]
    errors += [f"{key}: missing" for key in known if key not in data]
    for key in ("step", "weights_version"):
        if key in data and not _is_count(data[key]):
            errors.append(f"{key}: must be a non-negative integer, got {data[key]!r}")
    if "scheduler" in data and not isinstance(data["scheduler"], dict):
        errors.append(f"scheduler: must be a JSON object, got {type(data['scheduler']).__name__}")
    total = data.get("gpu_seconds_total", 0.0)
    if (isinstance(total, bool) or not isinstance(total, int | float) or not math.isfinite(total)
            or total < 0):
        errors.append(f"gpu_seconds_total: must be a non-negative number, got {total!r}")
    return errors


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run's checkpoint (None when there is none), checked field by field before anyone
    acts on it: a bad one raises CheckpointError naming the file and every bad field."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSON syntax, or not UTF-8
        raise CheckpointError(f"{path}: not a JSON checkpoint ({exc})") from None
    errors = checkpoint_errors(data)
    if errors:
        raise CheckpointError(f"{path}: malformed checkpoint: " + "; ".join(errors))
    return Checkpoint(**data)
