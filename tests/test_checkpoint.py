"""A checkpoint is checked field by field before a run acts on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhfless.store.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)

GOOD = {"step": 3, "weights_version": 3, "scheduler": {}, "gpu_seconds_total": 12.5}


def test_a_saved_checkpoint_loads_back(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, Checkpoint(**GOOD))
    assert load_checkpoint(tmp_path) == Checkpoint(**GOOD)
    (tmp_path / "checkpoint.json").write_text(json.dumps({**GOOD, "gpu_seconds_total": 0}))
    assert load_checkpoint(tmp_path).gpu_seconds_total == 0  # an integer total is fine


@pytest.mark.parametrize("change, field", [
    ({"step": -1}, "step: must be a non-negative integer, got -1"),
    ({"step": 2.5}, "step: must be a non-negative integer, got 2.5"),
    ({"step": "3"}, "step: must be a non-negative integer, got '3'"),
    ({"step": True}, "step: must be a non-negative integer, got True"),
    ({"weights_version": None}, "weights_version: must be a non-negative integer"),
    ({"scheduler": []}, "scheduler: must be a JSON object, got list"),
    ({"gpu_seconds_total": -1.0}, "gpu_seconds_total: must be a non-negative number"),
    ({"gpu_seconds_total": math.nan}, "gpu_seconds_total: must be a non-negative number"),
    ({"gpu_seconds_total": "1"}, "gpu_seconds_total: must be a non-negative number"),
    ({"stpe": 3}, "stpe: unknown field"),
])
def test_each_malformed_field_is_named_with_the_file(tmp_path: Path, change: dict,
                                                     field: str) -> None:
    path = tmp_path / "checkpoint.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value).startswith(f"{path}: malformed checkpoint: ")
    assert field in str(info.value)


@pytest.mark.parametrize("content, why", [
    (b"[1, 2]", "(root): expected a JSON object, got list"),
    (b'{"step": 3}', "weights_version: missing"),
    (b'{"step": 3', "not a JSON checkpoint"),
    (b'{"step": "\xe9"}', "not a JSON checkpoint"),
])
def test_a_checkpoint_that_is_not_one_is_named(tmp_path: Path, content: bytes,
                                               why: str) -> None:
    (tmp_path / "checkpoint.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=str(tmp_path)) as info:
        load_checkpoint(tmp_path)
    assert why in str(info.value)
