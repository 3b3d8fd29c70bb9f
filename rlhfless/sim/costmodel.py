"""Time of generation, scoring and training from a roofline of FLOPs and bytes.

Decode: one engine iteration emits one token for each of its B running sequences.  It reads
all weights once plus the KV cache of every running sequence, and does 2·params·B matmul FLOPs
plus 4·layers·hidden FLOPs per context token of attention.  Its time is the larger of the
compute and memory times (roofline) plus a fixed per-iteration overhead and, with tensor
parallelism, two all-reduces per layer.  Between two scheduling events B is fixed and the
total context grows by B per iteration, so both terms are affine in the iteration index and a
whole segment of k iterations has a closed-form time: the engine never loops token by token.

A measured profile (JSON) replaces the roofline with a fitted affine law
tpot = a + b·B + c·context_tokens and a measured prefill rate; see `load_profile`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from rlhfless.sim.hardware import Efficiency, GiB, GPUSpec, ModelShape


def _line_sum(a: float, b: float, lo: int, hi: int) -> float:
    """Σ_{i=lo}^{hi-1} (a + b·i)."""
    n = hi - lo
    if n <= 0:
        return 0.0
    return n * a + b * (lo + hi - 1) * n / 2.0


class DecodeModel(Protocol):
    def iter_time(self, batch: int, ctx: float) -> float: ...

    def segment_time(self, batch: int, ctx0: float, k: int) -> float: ...


def iters_within(model: DecodeModel, batch: int, ctx0: float, dt: float, k_max: int) -> int:
    """Largest k ≤ k_max whose segment fits in dt seconds (segment time is increasing in k)."""
    if dt <= 0 or k_max <= 0:
        return 0
    if model.segment_time(batch, ctx0, k_max) <= dt:
        return k_max
    lo, hi = 0, k_max  # invariant: time(lo) <= dt < time(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if model.segment_time(batch, ctx0, mid) <= dt:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class RooflineDecode:
    """Decode iteration time of one serving instance (tp GPUs) from the roofline."""

    gpu: GPUSpec
    model: ModelShape
    tp: int
    eff: Efficiency

    def _lines(self, batch: int, ctx0: float) -> tuple[float, float, float, float, float]:
        m, g, tp = self.model, self.gpu, self.tp
        flops_rate = tp * g.flops * self.eff.decode_mfu
        byte_rate = tp * g.hbm_bw * self.eff.decode_bw
        attn = 4.0 * m.layers * m.hidden  # FLOPs per context token per iteration
        a_c = (2.0 * m.params * batch + attn * ctx0) / flops_rate
        b_c = attn * batch / flops_rate
        a_m = (m.weight_bytes + m.kv_bytes_per_token * ctx0) / byte_rate
        b_m = m.kv_bytes_per_token * batch / byte_rate
        fixed = self.eff.iter_overhead_s
        if tp > 1:  # two ring all-reduces of the [B, hidden] activations per layer
            msg = batch * m.hidden * 2.0 * 2.0 * (tp - 1) / tp
            fixed += 2 * m.layers * (self.eff.allreduce_lat_s + msg / self.gpu.intra_bw)
        return fixed, a_c, b_c, a_m, b_m

    def iter_time(self, batch: int, ctx: float) -> float:
        fixed, a_c, _, a_m, _ = self._lines(batch, ctx)
        return fixed + max(a_c, a_m)

    def segment_time(self, batch: int, ctx0: float, k: int) -> float:
        """Σ over k iterations, context ctx0 + batch·i at iteration i (exact, one kink)."""
        if k <= 0:
            return 0.0
        fixed, a1, b1, a2, b2 = self._lines(batch, ctx0)
        total = k * fixed
        if b1 == b2:
            return total + _line_sum(max(a1, a2), b1, 0, k)
        x = (a2 - a1) / (b1 - b2)  # where the compute and memory lines cross
        if b1 > b2:  # compute dominates from ceil(x) on
            m = min(max(math.ceil(x), 0), k)
            return total + _line_sum(a2, b2, 0, m) + _line_sum(a1, b1, m, k)
        m = min(max(math.floor(x) + 1, 0), k)  # compute dominates up to floor(x)
        return total + _line_sum(a1, b1, 0, m) + _line_sum(a2, b2, m, k)


@dataclass(frozen=True)
class AffineDecode:
    """Measured law tpot = a + b·batch + c·context_tokens (fitted from a profile file)."""

    a: float
    b: float
    c: float

    def iter_time(self, batch: int, ctx: float) -> float:
        return self.a + self.b * batch + self.c * ctx

    def segment_time(self, batch: int, ctx0: float, k: int) -> float:
        return _line_sum(self.a + self.b * batch + self.c * ctx0, self.c * batch, 0, k)


def attention_flops(layers: int, hidden: int, n_new, n_cached):  # floats or arrays
    """Causal attention FLOPs for n_new tokens appended after n_cached context tokens."""
    return 2.0 * layers * hidden * (2.0 * n_new * n_cached + n_new * n_new)


@dataclass(frozen=True)
class Prefill:
    """Prefill (prompt or resumed context) time on one serving instance; compute-bound."""

    gpu: GPUSpec
    model: ModelShape
    tp: int
    eff: Efficiency
    measured_tok_per_s: float | None = None

    def time(self, n_new: float, n_cached: float = 0.0) -> float:
        if n_new <= 0:
            return 0.0
        if self.measured_tok_per_s:
            return n_new / self.measured_tok_per_s
        m = self.model
        flops = 2.0 * m.params * n_new + attention_flops(m.layers, m.hidden, n_new, n_cached)
        return flops / (self.tp * self.gpu.flops * self.eff.prefill_mfu)

    def tokens_per_s(self) -> float:
        return self.measured_tok_per_s or 1.0 / self.time(1.0)


def forward_flops(
    model: ModelShape, prompt_len: np.ndarray, lengths: np.ndarray, dedup: bool
) -> float:
    """Forward FLOPs to score groups: prompt_len [n], response lengths [n, G].

    dedup: each prompt is run once and its KV cache is shared by the G responses (the
    shared-prefix scorer); otherwise every (prompt, response) is a separate sequence.
    """
    p = np.asarray(prompt_len, dtype=float)
    r = np.asarray(lengths, dtype=float)
    lin = 2.0 * model.params
    L, d = model.layers, model.hidden
    if dedup:
        return float(
            lin * (p.sum() + r.sum())
            + attention_flops(L, d, p, 0.0).sum()
            + attention_flops(L, d, r, p[:, None]).sum()
        )
    s = p[:, None] + r
    return float(lin * s.sum() + attention_flops(L, d, s, 0.0).sum())


def group_forward_flops(
    model: ModelShape, prompt_len: np.ndarray, lengths: np.ndarray, dedup: bool
) -> np.ndarray:
    """`forward_flops` per group (row): prompt_len [n], response lengths [n, G] -> [n]."""
    p = np.asarray(prompt_len, dtype=float)
    r = np.asarray(lengths, dtype=float)
    lin = 2.0 * model.params
    L, d = model.layers, model.hidden
    if dedup:
        return (lin * (p + r.sum(axis=1)) + attention_flops(L, d, p, 0.0)
                + attention_flops(L, d, r, p[:, None]).sum(axis=1))
    s = p[:, None] + r
    return (lin * s + attention_flops(L, d, s, 0.0)).sum(axis=1)


def compute_time(flops: float, gpus: int, gpu: GPUSpec, mfu: float) -> float:
    """Data-parallel work balanced over `gpus` (verl's balance_batch / our token balancing)."""
    return flops / (gpus * gpu.flops * mfu)


def kv_capacity_tokens(
    gpu: GPUSpec, model: ModelShape, tp: int, mem_util: float, act_reserve: float = 3 * GiB
) -> int:
    """KV-cache tokens one serving instance holds at vLLM's gpu_memory_utilization."""
    free = tp * (gpu.mem_bytes * mem_util - act_reserve) - model.weight_bytes
    if free <= 0:
        raise ValueError(
            f"{model.name} does not fit on {tp}×{gpu.name} at memory utilisation {mem_util}"
        )
    return int(free / model.kv_bytes_per_token)


def learner_bytes_per_gpu(model: ModelShape, gpus: int, critic: bool) -> float:
    """Fully sharded trainer state (+ reference weights) per GPU: bf16 weights and grads,
    fp32 master weights and two Adam moments = 16 bytes/param; reference = 2 bytes/param."""
    per_param = 16.0 * (2 if critic else 1) + 2.0
    return per_param * model.params / gpus


def learner_fits(gpu: GPUSpec, model: ModelShape, gpus: int, critic: bool) -> bool:
    activations = 12 * GiB  # micro-batch activations with recomputation, long sequences
    return learner_bytes_per_gpu(model, gpus, critic) + activations <= gpu.mem_bytes


@dataclass(frozen=True)
class MeasuredProfile:
    decode: AffineDecode
    prefill_tok_per_s: float


def load_profile(path: str | Path) -> MeasuredProfile:
    """Read a measured profile: {"prefill_tok_per_s": x, "tpot": {"a","b","c"}} or
    {"prefill_tok_per_s": x, "tpot_samples": [[batch, context_tokens, seconds], ...]}
    (samples are least-squares fitted to a + b·batch + c·context)."""
    data = json.loads(Path(path).read_text())
    if "tpot" in data:
        t = data["tpot"]
        decode = AffineDecode(float(t["a"]), float(t["b"]), float(t["c"]))
    else:
        rows = np.asarray(data["tpot_samples"], dtype=float)
        if rows.ndim != 2 or rows.shape[1] != 3 or len(rows) < 3:
            raise ValueError("tpot_samples needs ≥3 rows of [batch, context_tokens, seconds]")
        design = np.column_stack([np.ones(len(rows)), rows[:, 0], rows[:, 1]])
        coef, *_ = np.linalg.lstsq(design, rows[:, 2], rcond=None)
        decode = AffineDecode(*(float(c) for c in coef))
    return MeasuredProfile(decode, float(data["prefill_tok_per_s"]))
