"""The driver's checkpoint: one JSON file replaced atomically after each recorded step.

Weights live in the weight store; the checkpoint says which version is current and carries the
scheduler state (length predictor, profile), so a resumed run plans exactly as it would have.
A copy of every checkpoint is kept in `checkpoints/` while its weights version exists, so a
run whose current version is found corrupt falls back to the newest intact one (`recover`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
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


def _read(path: Path) -> Checkpoint:
    try:
        return Checkpoint(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid checkpoint: {exc}") from None


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
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
