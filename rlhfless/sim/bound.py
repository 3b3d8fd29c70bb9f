"""A lower bound on one synchronous RL step: the same work, the same peak GPUs.

    bound = max(critical path, total GPU work / peak GPUs)

* critical path: the group whose prefill + decode of its longest sample *alone on an
  instance* (batch 1, the cost model's own iteration time, context growing) + its learner
  work spread over every GPU is the longest. No schedule finishes a step before its slowest
  group has been generated and learned from.
* total GPU work: every sample's prefill and decode at the cost model's floor — per token the
  larger of its matmul + attention FLOPs at the decode MFU and its KV-cache reads at the
  decode bandwidth, the weights read once per iteration of a full batch (``max_seqs``) — plus
  the learner's reference forward and policy forward/backward (+ critic) with shared-prefix
  deduplication (the least any system computes; no separate old log-prob pass).

Nothing of a real schedule (cold starts, weight sync, stragglers) is in it, so a step at 1.0×
the bound is impossible in practice; the ratio says how far a system is from the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from rlhfless.sim.config import SimConfig


@dataclass(frozen=True)
class Bound:
    critical_s: float
    work_s: float

    @property
    def step_s(self) -> float:
        return max(self.critical_s, self.work_s)


def _decode_floor_gpu_s(cfg: SimConfig, prompt: np.ndarray, n: np.ndarray) -> float:
    """GPU-seconds of decoding n tokens after `prompt` tokens, at the roofline's floor."""
    m, g, e = cfg.shape, cfg.hw, cfg.eff
    tp = cfg.tp
    ctx = n * prompt + 0.5 * n * n  # context tokens read over the n iterations
    attn = 4.0 * m.layers * m.hidden
    compute = (2.0 * m.params * n + attn * ctx) / (tp * g.flops * e.decode_mfu)
    weights = m.weight_bytes / cfg.max_seqs  # one read per iteration, shared by a full batch
    memory = (weights * n + m.kv_bytes_per_token * ctx) / (tp * g.hbm_bw * e.decode_bw)
    overhead = e.iter_overhead_s * n / cfg.max_seqs
    return float(tp * (np.maximum(compute, memory) + overhead).sum())


def step_bound(cfg: SimConfig, prompt_len: np.ndarray, lengths: np.ndarray,
               peak_gpus: int) -> Bound:
    """The bound for one step's groups: prompt_len [n], response lengths [n, G]."""
    p = np.asarray(prompt_len, dtype=float)
    r = np.asarray(lengths, dtype=float)
    lean = replace(cfg, learner_logprob_pass=False)
    learn = lean.learner_gpu_s(p, r, dedup=True)
    longest = r.max(axis=1)
    critical = max(
        cfg.prefill.time(float(p[k])) + cfg.decode.segment_time(1, float(p[k]), int(longest[k]))
        + float(learn[k]) / peak_gpus
        for k in range(len(p)))
    gen = _decode_floor_gpu_s(cfg, np.repeat(p, r.shape[1]), r.reshape(-1))
    prefill = float(sum(cfg.prefill.time(float(x)) for x in p)) * cfg.tp
    return Bound(critical_s=critical, work_s=(gen + prefill + float(learn.sum())) / peak_gpus)
