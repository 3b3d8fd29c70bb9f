"""Thin adapter from the simulator to the real scheduling policies (`rlhfless.scheduling`).

No policy logic lives here: only the translation between the simulator's objects (requests,
the roofline cost model) and the numbers the policies take, so the driver and the simulator
make the same decisions from the same inputs (`rlhfless.scheduling.planning` builds them).

Two ways to build the planner's inputs (`SimConfig.planner_inputs`):

* "kv-aware" (the scheduling defaults) — `GroupLengthPredictor` gives each group's mean and
  longest sample, the profile is fitted by `Profile.from_tpot_samples` to what a profiler
  measures (tpot on a grid of batch sizes × contexts per sequence, within the KV cache: the
  KV-read coefficient `tpot_per_ctx_s` included; the affine law then matches the roofline
  within ~2% where decode runs), and `planning_workload` carries the groups' KV reads.
* "mean" — the inputs before: the longest sample planned as the group mean, tpot(b) fitted at
  the batch's typical context, no context term.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rlhfless.scheduling.learner import LearnerProfile
from rlhfless.scheduling.migrate import cut_threshold, plan_migration, remaining_estimate
from rlhfless.scheduling.planning import planning_workload, prewarm_margin
from rlhfless.scheduling.prewarm import PrewarmPlan, prewarm_plan
from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.workmodel import Workload
from rlhfless.sim.config import SimConfig
from rlhfless.sim.costmodel import kv_capacity_tokens
from rlhfless.sim.engine import Request

_PROFILE_BATCHES = (1, 8, 32, 64, 128, 256)
_PROFILE_CONTEXTS = (0, 1024, 4096, 16384)  # context tokens per running sequence
INPUTS = ("mean", "kv-aware")


def actor_profile(cfg: SimConfig, prompt_len: np.ndarray, pred_mean: np.ndarray,
                  cold_start_s: float, inputs: str, linger_s: float) -> Profile:
    """What an operator would profile on one actor instance, fitted to the policies' law,
    with the KV-cache bounds on the batch. "kv-aware": tpot at several batch sizes at zero
    context plus a few contexts (`Profile.from_tpot_samples`) and the KV capacity in tokens;
    "mean": tpot(b) at the batch's typical context (prompt + half the mean response), no
    context term. `linger_s`: what an actor with nothing left is billed (the
    keep-alive, or the scale-down when the driver releases it)."""
    if inputs not in INPUTS:
        raise ValueError(f"planner_inputs must be one of {INPUTS}, got {inputs!r}")
    ctx = float(np.mean(prompt_len) + 0.5 * np.mean(pred_mean))
    cap = kv_capacity_tokens(cfg.hw, cfg.shape, cfg.tp, cfg.dedicated_mem_util)
    fields = dict(
        prefill_tok_per_s=cfg.prefill.tokens_per_s(),
        cold_start_s=cold_start_s,
        keep_alive_s=linger_s,
        gpus_per_actor=cfg.tp,
        max_batch=int(max(1, min(cfg.max_seqs, cap // max(1.0, 2 * ctx)))),
    )
    batches = [b for b in _PROFILE_BATCHES if b <= cfg.max_seqs]
    if inputs == "mean":
        table = {b: cfg.decode.iter_time(b, b * ctx) for b in (*batches, 512)}
        return Profile.from_tpot_table(table, **fields)
    rows = [(b, float(b * c), cfg.decode.iter_time(b, float(b * c)))
            for b in batches for c in _PROFILE_CONTEXTS if b * c <= cap]
    return Profile.from_tpot_samples(rows, kv_tokens=float(cap), **fields)


def work_units(pred_mean: np.ndarray, pred_max: np.ndarray, group_size: int,
               prompt_len: np.ndarray, inputs: str,
               mean_square: np.ndarray | None = None) -> Workload:
    if inputs == "mean":
        return planning_workload(pred_mean, None, group_size, prompt_len, context=False)
    return planning_workload(pred_mean, pred_max, group_size, prompt_len,
                             mean_square=mean_square)


def cut_after(total: int, tau: float) -> int:
    """The actor's cut rule: return once this many of its `total` samples are done."""
    return cut_threshold(total, tau)


def migration_bins(unfinished: Sequence[Request], n_from: int, profile: Profile, lam: float,
                   max_new_tokens: int, inputs: str = "kv-aware") -> list[list[int]]:
    """Where the cut samples continue: `plan_migration` on their predicted remaining tokens,
    re-prefill (prompt + partial response), continuation KV reads, groups kept together."""
    pred = np.array([r.predicted for r in unfinished])
    gen = np.array([float(r.generated) for r in unfinished])
    remaining = remaining_estimate(pred, gen, max_new_tokens)
    prefill = np.array([float(r.prompt_len + r.generated) for r in unfinished])
    plan = plan_migration(remaining, n_from, profile, lam=lam, prefill_tokens=prefill,
                          keys=[r.group for r in unfinished], context=inputs == "kv-aware")
    return [b for b in plan.bins if b]


def learner_profile(cfg: SimConfig, gpu_s_per_token: float, max_gpus: int) -> LearnerProfile:
    """The learner as the planner sees it: measured throughput, init, state load and the
    finish (gradient reduction, optimizer step, state offload, publish) at its smallest
    size (an upper estimate for larger ones)."""
    smallest = cfg.learner_min_gpus()
    load_gpu_s = cfg.learner_load_s(1)  # whole state over one GPU's bandwidth
    return LearnerProfile(
        gpu_s_per_token=gpu_s_per_token, init_s=cfg.over.learner_init_s,
        load_gpu_s=load_gpu_s, finish_s=cfg.learner_finish_s(smallest),
        min_gpus=min(smallest, max_gpus), max_gpus=max_gpus, gpu_step=cfg.learner_gpu_step)


@dataclass(frozen=True)
class Prewarm:
    """The prewarm plan turned into start times on this step's clock."""

    plan: PrewarmPlan | None

    def at(self, stage: str, phase_starts: Mapping[str, float], default: float | None):
        if self.plan is None or stage not in self.plan.start_phase:
            return default
        phase = self.plan.start_phase[stage]
        if phase not in phase_starts:  # its start falls in an earlier cycle: as early as we can
            return min(phase_starts.values())
        return phase_starts[phase] + self.plan.start_offsets[stage]

    def keeps_warm(self, stage: str) -> bool:
        return self.plan is not None and stage in self.plan.keep_warm


def prewarm(enabled: bool, durations: Mapping[str, float],
            cold_starts: Mapping[str, float]) -> Prewarm:
    """`prewarm_plan` on the measured phase times with the scheduling package's margin."""
    if not enabled:
        return Prewarm(None)
    return Prewarm(prewarm_plan(durations, cold_starts, margin_s=prewarm_margin(cold_starts)))
