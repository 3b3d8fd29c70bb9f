"""Thin adapter from the simulator to the real scheduling policies (`rlhfless.scheduling`).

No policy logic lives here: only the translation between the simulator's objects (requests,
the roofline cost model) and the numbers the policies take, so the driver and the simulator
make the same decisions from the same inputs.

Two ways to build those inputs (`inputs`):

* "kv-aware" (the default) — a second EWMA predictor of each group's *longest* sample gives
  `lmax` (the mean predictor gives `tokens`), the profile is tpot(b) measured at zero context
  plus the optional KV-read coefficient `Profile.tpot_per_ctx_s`, and each group carries its
  context-token reads (`Workload.groups(..., lmax=, context=True)`), so long bins are not
  under-predicted.
* "driver" — what `rlhfless/driver.py` feeds today: one EWMA predictor of each group's mean
  length, the group as `Workload.groups(mean, G, prompt)` (its longest sample taken to be the
  mean), and tpot(b) fitted at the batch's typical context (no context term).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rlhfless.scheduling.assign import assign_workload
from rlhfless.scheduling.migrate import cut_threshold, plan_migration, remaining_estimate
from rlhfless.scheduling.predictor import LengthPredictor
from rlhfless.scheduling.prewarm import PrewarmPlan, prewarm_plan
from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.scaling import choose_actor_count
from rlhfless.scheduling.workmodel import Workload, context_tokens, makespan
from rlhfless.sim.config import SimConfig
from rlhfless.sim.costmodel import kv_capacity_tokens
from rlhfless.sim.engine import Request

_PROFILE_BATCHES = (1, 4, 16, 64, 128, 256, 512)
INPUTS = ("driver", "kv-aware")


class Predictors:
    """EWMA of each prompt's mean group length (what the driver feeds) and of its longest
    sample (used by the "kv-aware" inputs)."""

    def __init__(self, alpha: float):
        self.mean = LengthPredictor(alpha=alpha)
        self.max = LengthPredictor(alpha=alpha)

    def predict(self, ids: Sequence[str], enabled: bool) -> tuple[np.ndarray, np.ndarray]:
        if not enabled:  # every group looks the same: the predictor's prior
            flat = np.full(len(ids), self.mean.prior)
            return flat, flat
        return self.mean.predict(ids), np.maximum(self.max.predict(ids), self.mean.predict(ids))

    def observe(self, ids: Sequence[str], lengths: np.ndarray, enabled: bool) -> None:
        if enabled:
            self.mean.update(ids, lengths.mean(axis=1))
            self.max.update(ids, lengths.max(axis=1))


def _ctx_slope(cfg: SimConfig) -> float:
    """Seconds per iteration per context token held (KV reads) in the true cost model."""
    big = 1e6
    return (cfg.decode.iter_time(1, big) - cfg.decode.iter_time(1, 0.0)) / big


def actor_profile(cfg: SimConfig, prompt_len: np.ndarray, pred_mean: np.ndarray,
                  pred_max: np.ndarray, cold_start_s: float, inputs: str) -> Profile:
    """What an operator would profile: tpot at several batch sizes, fitted to the policies'
    affine law, with the KV-cache bound on the batch.  "driver": at the batch's typical
    context (prompt + half the mean response); "kv-aware": at zero context, plus the
    KV-read slope (seconds per iteration per context token) as `tpot_per_ctx_s`."""
    ctx = float(np.mean(prompt_len) + 0.5 * np.mean(pred_mean))
    at = 0.0 if inputs == "kv-aware" else ctx
    table = {b: cfg.decode.iter_time(b, b * at) for b in _PROFILE_BATCHES if b <= cfg.max_seqs}
    cap = kv_capacity_tokens(cfg.hw, cfg.shape, cfg.tp, cfg.dedicated_mem_util)
    max_batch = int(max(1, min(cfg.max_seqs, cap // max(1.0, 2 * ctx))))
    return Profile.from_tpot_table(
        table,
        tpot_per_ctx_s=_ctx_slope(cfg) if inputs == "kv-aware" else 0.0,
        prefill_tok_per_s=cfg.prefill.tokens_per_s(),
        cold_start_s=cold_start_s,
        keep_alive_s=cfg.sched.keep_alive_s,
        gpus_per_actor=cfg.tp,
        max_batch=max_batch,
    )


def _kv_tokens(profile: Profile, ctx0: np.ndarray, n: np.ndarray) -> np.ndarray:
    """KV-read seconds of decoding n tokens from context ctx0, in prefill-token units
    (`plan_migration` takes additive work as prefill tokens)."""
    return profile.tpot_per_ctx_s * context_tokens(ctx0, n) * profile.prefill_tok_per_s


def work_units(cfg: SimConfig, profile: Profile, pred_mean: np.ndarray, pred_max: np.ndarray,
               group_size: int, prompt_len: np.ndarray, inputs: str) -> Workload:
    p = np.asarray(prompt_len, dtype=float)
    if inputs == "driver":
        return Workload.groups(pred_mean, group_size, p)
    return Workload.groups(pred_mean, group_size, p, lmax=pred_max, context=True)


def choose_n(work: Workload, profile: Profile, lam: float, max_actors: int, policy: str,
             seed: int) -> tuple[int, list[list[int]]]:
    """Cost-aware N by λ, and the assignment for it."""
    d = choose_actor_count(work, 1, profile, lam, max_actors, policy=policy, seed=seed)
    return d.n, d.bins


def assign_bins(work: Workload, n: int, profile: Profile, policy: str,
                seed: int) -> list[list[int]]:
    return assign_workload(work, n, profile, policy, seed)


def predicted_makespan(work: Workload, bins: list[list[int]], profile: Profile) -> float:
    return makespan(work, bins, profile)


def cut_after(total: int, tau: float) -> int:
    """The actor's cut rule: return once this many of its `total` samples are done."""
    return cut_threshold(total, tau)


def migration_bins(unfinished: Sequence[Request], n_from: int, profile: Profile, lam: float,
                   max_new_tokens: int, cfg: SimConfig | None = None,
                   inputs: str = "driver") -> list[list[int]]:
    """Where the cut samples continue: `plan_migration` on their predicted remaining tokens,
    re-prefill (prompt + partial response) and groups kept together."""
    pred = np.array([r.predicted for r in unfinished])
    gen = np.array([float(r.generated) for r in unfinished])
    remaining = remaining_estimate(pred, gen, max_new_tokens)
    prefill = np.array([float(r.prompt_len + r.generated) for r in unfinished])
    if inputs == "kv-aware" and cfg is not None:
        prefill = prefill + _kv_tokens(profile, prefill, remaining)
    plan = plan_migration(remaining, n_from, profile, lam=lam, prefill_tokens=prefill,
                          keys=[r.group for r in unfinished])
    return [b for b in plan.bins if b]


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
    """`prewarm_plan` on the measured phase times, with a safety margin of half the longest
    cold start: rollouts vary from step to step, and a stage started too late puts the rest
    of its cold start on the critical path (too early only bills idle seconds)."""
    if not enabled:
        return Prewarm(None)
    return Prewarm(prewarm_plan(durations, cold_starts, margin_s=prewarm_margin(cold_starts)))


def prewarm_margin(cold_starts: Mapping[str, float]) -> float:
    return 0.5 * max(cold_starts.values(), default=0.0)


def keep_or_prewarm(releases: Sequence[float], n_needed: int, ready_by: float,
                    lead: float) -> tuple[list[float], float | None]:
    """Per actor instance, the cheaper way to have `n_needed` of them ready at `ready_by`:
    stay alive from its own release (billed ready_by − release), or scale to zero and be
    prewarmed `lead` seconds before (billed lead).  Returns the releases of the instances
    kept warm (latest first) and when to prewarm the rest (None if none is needed)."""
    latest = sorted(releases, reverse=True)[:max(0, n_needed)]
    keep = [r for r in latest if ready_by - r <= lead]
    return keep, (ready_by - lead if len(keep) < n_needed else None)
