"""Synthetic length families and trace files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhfless.sim.workload import FAMILIES, load_trace, save_trace, synthetic


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_are_truncated_and_seeded(family):
    w = synthetic(family, 200, 8, 3, seed=5)
    assert w.lengths.shape == (3, 200, 8)
    assert w.lengths.min() >= 1 and w.lengths.max() <= w.max_len
    assert np.array_equal(w.lengths, synthetic(family, 200, 8, 3, seed=5).lengths)
    assert not np.array_equal(w.lengths, synthetic(family, 200, 8, 3, seed=6).lengths)


def test_long_tail_families_are_long_tailed():
    short = synthetic("gsm8k", 400, 8, 1, seed=0)
    long = synthetic("longtail", 400, 8, 1, seed=0)
    assert long.tail_ratio() > 2 * short.tail_ratio()
    assert (long.lengths == long.max_len).mean() > 0.005  # samples pile up at the limit
    heavier = synthetic("longtail", 400, 8, 1, seed=0, sigma=1.2)
    assert heavier.tail_ratio() > long.tail_ratio()


def test_prompt_lengths_persist_across_epochs():
    """Most GSM8K-like prompts move < 50 tokens between epochs; and in every family a
    prompt's length this epoch predicts next epoch's far better than the batch mean does."""
    w = synthetic("gsm8k", 500, 16, 3, seed=1)
    assert w.persistence() > 0.8
    for fam in FAMILIES:
        w = synthetic(fam, 500, 16, 2, seed=1)
        m = w.lengths.mean(axis=2)
        err_prompt = np.abs(m[1] - m[0]).mean()
        err_global = np.abs(m[1] - m[1].mean()).mean()
        assert err_prompt < 0.6 * err_global, fam


def test_steps_cover_each_prompt_once_per_epoch():
    w = synthetic("gsm8k", 64, 4, 2, seed=0)
    steps = list(w.steps(16, seed=3))
    assert len(steps) == 8
    for e in range(2):
        seen = np.concatenate([p for ep, p in steps if ep == e])
        assert sorted(seen.tolist()) == list(range(64))


def test_trace_round_trip_and_errors(tmp_path):
    w = synthetic("bimodal", 10, 3, 2, seed=2)
    path = tmp_path / "t.jsonl"
    save_trace(w, path)
    back = load_trace(path)
    assert np.array_equal(back.lengths, w.lengths[:, np.argsort([str(i) for i in range(10)])])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_id": 1, "epoch": 0}) + "\n")
    with pytest.raises(ValueError, match="need prompt_id, epoch, length"):
        load_trace(bad)
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text("\n".join(json.dumps({"prompt_id": p, "epoch": 0, "length": 5})
                                for p in (1, 1, 2)))
    with pytest.raises(ValueError, match="different sizes"):
        load_trace(ragged)
