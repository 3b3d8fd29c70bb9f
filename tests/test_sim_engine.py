"""The cluster model's physics: roofline closed forms and the continuous-batching engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhfless.sim.costmodel import (
    AffineDecode,
    Prefill,
    RooflineDecode,
    forward_flops,
    iters_within,
    kv_capacity_tokens,
    load_profile,
)
from rlhfless.sim.engine import Engine, Request
from rlhfless.sim.hardware import H100, L40S, MODELS, Efficiency

EFF = Efficiency()


def _decode(model: str = "7b", gpu=H100) -> RooflineDecode:
    shape = MODELS[model]
    return RooflineDecode(gpu, shape, shape.tp, EFF)


def _engine(model="7b", cap=10**9, prefix=True, max_seqs=1024) -> Engine:
    shape = MODELS[model]
    return Engine(0, _decode(model), Prefill(H100, shape, shape.tp, EFF), cap, max_seqs, prefix)


@pytest.mark.parametrize("model,gpu", [("7b", H100), ("70b", H100), ("3b", L40S)])
@pytest.mark.parametrize("batch", [1, 7, 64, 900])
def test_segment_time_equals_iteration_sum(model, gpu, batch):
    d = _decode(model, gpu)
    ctx0 = batch * 300.0
    k = 1500
    direct = sum(d.iter_time(batch, ctx0 + batch * i) for i in range(k))
    assert d.segment_time(batch, ctx0, k) == pytest.approx(direct, rel=1e-9)


def test_decode_roofline_sanity():
    d = _decode("7b")
    # 7B bf16 at batch 1 is memory-bound: ~15 GB / (3.35 TB/s · 0.8) + 3 ms overhead ≈ 8.7 ms.
    assert 0.007 < d.iter_time(1, 500) < 0.011
    # Bigger batches cost more per iteration but much less per token.
    assert d.iter_time(256, 256 * 1000) > d.iter_time(1, 1000)
    assert d.iter_time(256, 256 * 1000) / 256 < d.iter_time(1, 1000) / 10
    # 70B on 8 GPUs adds all-reduces and is slower per iteration than 7B on one.
    assert _decode("70b").iter_time(1, 500) > d.iter_time(1, 500)


def test_iters_within_is_the_largest_fitting_k():
    d = _decode("7b")
    dt = 1.234
    k = iters_within(d, 32, 32 * 400, dt, 10**6)
    assert d.segment_time(32, 32 * 400, k) <= dt < d.segment_time(32, 32 * 400, k + 1)


def test_engine_uniform_batch_matches_closed_form():
    """B identical requests admitted at once: prefill once per group, then L iterations."""
    e = _engine()
    p, length, b = 200, 500, 16
    e.add([Request(i, 0, p, length) for i in range(b)], 0.0)
    while not e.idle:
        e.step()
    expected = e.prefill.time(p) + e.decode.segment_time(b, b * p, length)
    assert e.t == pytest.approx(expected, rel=1e-12)
    assert e.stats.decode_tokens == b * length
    assert e.stats.prefill_tokens == p and e.stats.prefill_saved == p * (b - 1)


def test_prefix_cache_off_prefills_every_sample():
    e = _engine(prefix=False)
    e.add([Request(i, 0, 100, 10) for i in range(4)], 0.0)
    while not e.idle:
        e.step()
    assert e.stats.prefill_tokens == 400 and e.stats.prefill_saved == 0


def test_preemption_and_migration_conserve_tokens():
    """Tight KV forces preemptions; half the work is then cut and moved to another engine.
    Every response token is still decoded exactly once."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(50, 3000, 120)
    reqs = [Request(i, i // 8, 150, int(n)) for i, n in enumerate(lengths)]
    a, b = _engine(cap=60_000), _engine(cap=60_000)
    b.eid = 1
    a.add(reqs, 0.0)
    for _ in range(60):
        a.step()
    a.advance_to(a.t + 0.37)  # cut mid-segment, as a migration at an arbitrary time would
    moved = a.take_unfinished()
    assert moved and all(0 <= r.generated < r.length for r in moved)
    b.add(moved, a.t)
    while not b.idle:
        b.step()
    assert a.stats.preemptions > 0
    assert all(r.generated == r.length and np.isfinite(r.finish_time) for r in reqs)
    assert a.stats.decode_tokens + b.stats.decode_tokens == int(lengths.sum())
    assert a.stats.finished + b.stats.finished == len(reqs)


def test_kv_capacity_and_memory_util():
    cap_lo = kv_capacity_tokens(H100, MODELS["70b"], 8, 0.5)
    cap_hi = kv_capacity_tokens(H100, MODELS["70b"], 8, 0.9)
    assert 0 < cap_lo < cap_hi
    with pytest.raises(ValueError, match="does not fit"):
        kv_capacity_tokens(L40S, MODELS["70b"], 1, 0.9)


def test_forward_flops_dedup_saves_prompt_work():
    shape = MODELS["7b"]
    p = np.array([1000.0, 500.0])
    r = np.full((2, 8), 100.0)
    full, dedup = forward_flops(shape, p, r, False), forward_flops(shape, p, r, True)
    linear_saved = 2 * shape.params * (1000 + 500) * 7
    assert full - dedup >= linear_saved  # plus some attention
    g1 = np.full((2, 1), 100.0)  # a group of one shares nothing
    assert forward_flops(shape, p, g1, True) == pytest.approx(forward_flops(shape, p, g1, False))


def test_measured_profile_fit(tmp_path):
    rows = [[b, c, 0.005 + 2e-5 * b + 1e-9 * c] for b in (1, 8, 64) for c in (1e3, 1e5, 1e6)]
    path = tmp_path / "prof.json"
    path.write_text(json.dumps({"prefill_tok_per_s": 9000, "tpot_samples": rows}))
    prof = load_profile(path)
    assert prof.decode.a == pytest.approx(0.005) and prof.decode.b == pytest.approx(2e-5)
    assert prof.decode.c == pytest.approx(1e-9, rel=1e-6) and prof.prefill_tok_per_s == 9000
    d = AffineDecode(0.01, 1e-4, 1e-8)
    direct = sum(d.iter_time(5, 100 + 5 * i) for i in range(77))
    assert d.segment_time(5, 100, 77) == pytest.approx(direct)
