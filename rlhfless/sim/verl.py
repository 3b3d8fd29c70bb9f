"""The serverful baselines: verl (colocated) and RLHFuse-like (tail migration + fused scoring).

verl, as its GRPO/PPO trainer runs by default: every GPU is reserved for the whole job and
hosts the hybrid engine (FSDP actor + vLLM rollout, same process).  A step is
    weight reshard + sleep/wake  →  generate  →  old log-probs, reference (+critic values)
    →  actor (+critic) update
each phase on all GPUs.  The batch (prompts repeated G times, groups contiguous) is split in
equal-count contiguous chunks over the data-parallel rollout replicas (`DataProto.chunk`);
each replica is a vLLM engine with continuous batching and prefix caching at verl's default
gpu_memory_utilization.  Scoring and training are token-balanced over all GPUs
(balance_batch, remove-padding), so they run at the cluster's FLOP rate.  Billing: all GPUs
for the whole step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rlhfless.sim.config import SimConfig
from rlhfless.sim.engine import Engine, Request
from rlhfless.sim.results import StepResult
from rlhfless.sim.rollout import make_groups, run_lockstep, run_until_cut
from rlhfless.sim.workload import Workload


def _split_evenly(samples: list[Request], engines: Sequence[Engine]) -> None:
    chunks = np.array_split(np.arange(len(samples)), len(engines))
    for e, chunk in zip(engines, chunks, strict=True):
        e.add([samples[i] for i in chunk], e.t)


def _scoring_models(cfg: SimConfig) -> int:
    return 3 if cfg.critic else 2  # old log-probs + reference (+ critic values)


def _gen_stats(engines: Sequence[Engine]) -> dict[str, float]:
    return {
        "tokens": sum(e.stats.decode_tokens for e in engines),
        "prefill_tokens": sum(e.stats.prefill_tokens for e in engines),
        "prefill_saved": sum(e.stats.prefill_saved for e in engines),
        "preemptions": sum(e.stats.preemptions for e in engines),
        "busy": sum(e.stats.busy_s for e in engines),
    }


def tail_share(samples: Sequence[Request], start: float, end: float,
               fraction: float = 0.9) -> float:
    """Share of the rollout's time spent after `fraction` of the requests finished (Seer's
    "the last 10% of requests take up to 50% of rollout time")."""
    done = np.sort([r.finish_time for r in samples])
    k = min(len(done) - 1, int(np.ceil(fraction * len(done))) - 1)
    return float((end - done[k]) / (end - start)) if end > start else 0.0


def verl_step(cfg: SimConfig, w: Workload, step: int, epoch: int, prompts) -> StepResult:
    groups = make_groups(w, epoch, prompts)
    samples = [r for g in groups for r in g]
    engines = [cfg.engine(i, 0.0, cfg.colocated_mem_util) for i in range(cfg.max_replicas)]
    _split_evenly(samples, engines)
    for e in engines:
        run_until_cut(e, None)
    gen = max(r.finish_time for r in samples)
    pl, lens = w.prompt_len[prompts], w.lengths[epoch, prompts]
    phases = {
        "sync": cfg.reshard_s() + cfg.over.colocated_switch_s,
        "gen": gen,
        "score": cfg.forward_s(pl, lens, False, cfg.gpus, _scoring_models(cfg)),
        "train": cfg.train_s(pl, lens, False, cfg.gpus),
        "reward": cfg.over.reward_s,
    }
    st = _gen_stats(engines)
    step_s = sum(phases.values())
    return StepResult(
        "verl", step, epoch, step_s, cfg.gpus * step_s, phases, int(st["tokens"]),
        int(st["prefill_tokens"]), int(st["prefill_saved"]), int(st["preemptions"]),
        actors=len(engines), peak_gpus=cfg.gpus, gen_busy_gpu_s=st["busy"] * cfg.tp,
        extra={"gen_share": gen / step_s, "tail10_share": tail_share(samples, 0.0, gen)},
    )


def _tail_instances(cfg: SimConfig, engines: Sequence[Engine], left: int) -> int:
    """RLHFuse picks its migration target count from profiles so that consolidating the tail
    does not slow it down: the fewest instances whose per-iteration time stays within 10%
    of the slowest instance's current one."""
    busy = [e for e in engines if e.batch]
    now_iter = max(cfg.decode.iter_time(e.batch, e.kv_used()) for e in busy)
    ctx_per_seq = sum(e.kv_used() for e in busy) / max(1, sum(e.batch for e in busy))
    for k in range(1, len(engines)):
        b = math.ceil(left / k)
        if b <= cfg.max_seqs and cfg.decode.iter_time(b, b * ctx_per_seq) <= 1.1 * now_iter:
            return k
    return len(engines)


def rlhfuse_step(cfg: SimConfig, w: Workload, step: int, epoch: int, prompts) -> StepResult:
    """RLHFuse-like: verl's layout, but once only `fuse_threshold` of the samples remain,
    the long tail is migrated onto a few replicas (re-prefilled there) and the freed GPUs
    switch to scoring the finished samples while the tail decodes (inter-stage fusion).
    Its intra-stage training fusion (pipeline bubbles) is not modelled."""
    groups = make_groups(w, epoch, prompts)
    samples = [r for g in groups for r in g]
    engines = [cfg.engine(i, 0.0, cfg.colocated_mem_util) for i in range(cfg.max_replicas)]
    _split_evenly(samples, engines)
    n = len(samples)
    state: dict[str, float] = {}

    def hook(e: Engine, finished: list[Request], now: float) -> list[Engine]:
        if "cut" in state:
            return []
        left = sum(x.unfinished() for x in engines)
        if left > state.get("try_below", cfg.fuse_threshold * n) or left == 0:
            return []
        for x in engines:
            x.advance_to(now)
        k = _tail_instances(cfg, engines, left)
        if k >= len(engines):  # consolidating now would slow the tail: retry 20% later
            state["try_below"] = 0.8 * left
            return engines
        keep = sorted(engines, key=lambda x: -x.unfinished())[:k]
        moved = [r for x in engines if x not in keep for r in x.take_unfinished()]
        per_target: list[list[Request]] = [[] for _ in keep]
        for i, r in enumerate(sorted(moved, key=lambda r: -r.generated)):
            r.migrations += 1
            r.kv_resident = True  # RLHFuse moves the KV cache instead of recomputing it
            per_target[i % k].append(r)
        kvb = cfg.shape.kv_bytes_per_token
        for x, reqs in zip(keep, per_target, strict=True):
            nbytes = kvb * sum(r.prompt_len + r.generated for r in reqs)
            x.add(reqs, now, stall_s=nbytes / (cfg.tp * cfg.hw.inter_bw))
        done_tokens = sum(r.prompt_len + r.length for r in samples if r.finish_time <= now)
        state.update(cut=now, kept=k, moved=len(moved), done_tokens=done_tokens)
        return engines

    run_lockstep(engines, hook)
    gen = max(r.finish_time for r in samples)
    pl, lens = w.prompt_len[prompts], w.lengths[epoch, prompts]
    score_all = cfg.forward_s(pl, lens, False, cfg.gpus, _scoring_models(cfg))
    overlapped = 0.0  # GPU-seconds of scoring done on freed GPUs before generation ended
    if "cut" in state:
        total_tokens = float((pl[:, None] + lens).sum())
        ready_work = score_all * cfg.gpus * state["done_tokens"] / total_tokens
        freed = (len(engines) - state["kept"]) * cfg.tp
        window = max(0.0, gen - state["cut"] - cfg.over.colocated_switch_s)
        overlapped = min(ready_work, freed * window)
    phases = {
        "sync": cfg.reshard_s() + cfg.over.colocated_switch_s,
        "gen": gen,
        "score": score_all - overlapped / cfg.gpus,
        "train": cfg.train_s(pl, lens, False, cfg.gpus),
        "reward": cfg.over.reward_s,
    }
    st = _gen_stats(engines)
    step_s = sum(phases.values())
    return StepResult(
        "rlhfuse", step, epoch, step_s, cfg.gpus * step_s, phases, int(st["tokens"]),
        int(st["prefill_tokens"]), int(st["prefill_saved"]), int(st["preemptions"]),
        actors=len(engines), migrated=int(state.get("moved", 0)), peak_gpus=cfg.gpus,
        gen_busy_gpu_s=st["busy"] * cfg.tp, extra={"overlapped_gpu_s": overlapped},
    )
