"""The driver's checkpoint: one JSON file replaced atomically after each recorded step.

Weights live in the weight store; the checkpoint says which version is current and carries the
scheduler state (length predictor, profile), so a resumed run plans exactly as it would have.
A copy of every checkpoint is kept in `checkpoints/` while its weights version exists, so a
run whose current version is found corrupt falls back to the newest intact one (`recover`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rlhfless.store.atomic import write_json_atomic
from rlhfless.store.weights import WeightStore, WeightStoreError

CHECKPOINT_FILE = "checkpoint.json"
HISTORY_DIR = "checkpoints"
_HISTORY_FILE = re.compile(r"^step-(\d+)\.json$")


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    step: int = 0
    weights_version: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)
    gpu_seconds_total: float = 0.0


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / HISTORY_DIR / f"step-{checkpoint.step:09d}.json",
                      asdict(checkpoint))
    path = run_dir / CHECKPOINT_FILE
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


def _read(path: Path) -> Checkpoint:
    """One checkpoint file, checked field by field before anyone acts on it."""
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


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run's checkpoint (None when there is none), checked field by field before anyone
    acts on it: a bad one raises CheckpointError naming the file and every bad field."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    return _read(path)


def history(run_dir: Path) -> list[Checkpoint]:
    """Kept checkpoints, newest step first (unreadable copies are skipped)."""
    folder = Path(run_dir) / HISTORY_DIR
    found = []
    for file in folder.glob("step-*.json") if folder.is_dir() else ():
        if _HISTORY_FILE.match(file.name):
            try:
                found.append(_read(file))
            except CheckpointError:
                continue
    return sorted(found, key=lambda c: c.step, reverse=True)


def prune_history(run_dir: Path, versions: set[int]) -> None:
    """Forget checkpoints whose weights version the store no longer holds."""
    folder = Path(run_dir) / HISTORY_DIR
    for file in folder.glob("step-*.json") if folder.is_dir() else ():
        try:
            if _read(file).weights_version not in versions:
                file.unlink(missing_ok=True)
        except CheckpointError:
            file.unlink(missing_ok=True)


@dataclass(frozen=True)
class Recovery:
    checkpoint: Checkpoint | None
    notice: str | None = None  # what was wrong and what was done about it


def recover(run_dir: Path, store: WeightStore, command: str = "") -> Recovery:
    """The checkpoint to resume from, after checking its weights version file by file.

    A corrupt or truncated current version falls back to the newest kept checkpoint whose
    version is intact (saying which file was bad and which steps run again); with none left,
    CheckpointError names the file and the one command that starts the run again.
    """
    current = load_checkpoint(run_dir)
    if current is None:
        return Recovery(current)
    try:
        store.verify(current.weights_version)
        return Recovery(current)
    except WeightStoreError as exc:
        problem = str(exc)
    for older in history(run_dir):
        if older.step >= current.step:
            continue
        try:
            store.verify(older.weights_version)
        except WeightStoreError:
            continue
        save_checkpoint(run_dir, older)
        return Recovery(older, (
            f"{problem}. Resuming from step {older.step} with weights version "
            f"{older.weights_version}, the newest intact version with a checkpoint; steps "
            f"{older.step + 1}–{current.step} run again."))
    again = f"rlhfless run {command} --overwrite" if command else "a fresh run (--overwrite)"
    raise CheckpointError(f"{problem}. No intact weights version with a checkpoint is left "
                          f"to fall back to; start again with: {again}")
