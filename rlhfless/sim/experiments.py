"""The experiments: each returns rows (dicts) that the CLI prints, saves and plots.

headline     the issue's table: speed-up and GPU-second saving vs the verl-like baseline,
             quota mode (same peak GPUs) first, then the shared pool (peak GPUs stated), with
             verl's generation share and RLHFless's step over the lower bound.
testbed      the paper's own testbed: 16 L40S, Qwen2.5-3B/7B, GSM8K-/GPQA-/LiveCodeBench-
             like lengths, GRPO and PPO (quota mode), beside the paper's 1.35× / 44.8%.
planner      predicted vs actual rollout time per step (7B and 70B, DAPO-like, quota).
coldstart    the cold-start variants (node cache, host memory, GPU snapshot).
ablation     7B DAPO-like, quota: the default with one mechanism changed at a time.
frontier     7B DAPO-like, quota: fixed actor counts N against the points λ picks.
sensitivity  7B DAPO-like, quota: the hand-off cut's τ.

Every RLHFless configuration is `SchedulingSpec`'s defaults (λ 0.5 within 2% of the fastest
plan, τ 1 = no hand-off cut, all other mechanisms on) and `SimConfig`'s (groups split over
actors where too long for one) unless a row says otherwise; runs are 8 epochs of one step
each, and every number is a mean over the warm epochs (2–7). Runs are cached within one
process, so `all` simulates each configuration once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from rlhfless.api.spec import SchedulingSpec
from rlhfless.sim.config import SimConfig
from rlhfless.sim.hardware import COLD_STARTS
from rlhfless.sim.results import STEP_PHASES, StepResult
from rlhfless.sim.runner import bound_parts, bounds, job_workload, run_system, warm
from rlhfless.sim.workload import Workload

Row = dict[str, object]

CLUSTERS = {"160xH100": ("h100", 20), "16xL40S": ("l40s", 2)}
# Batches (prompts per step, samples per prompt): DAPO's 512 × 16 for GRPO on the large
# cluster; the paper testbed's GRPO 128 × 16 and PPO 2048 × 1.
BATCH = {
    ("160xH100", "grpo"): (512, 16),
    ("160xH100", "ppo"): (8192, 1),
    ("16xL40S", "grpo"): (128, 16),
    ("16xL40S", "ppo"): (2048, 1),
}
PAPER = {"speedup": 1.35, "saving": 0.448}  # RLHFless paper, 16 L40S, Qwen2.5-3B/7B

_CACHE: dict[str, tuple[Workload, list[StepResult]]] = {}


def job(cluster: str, model: str, algo: str = "grpo", seed: int = 0, **kw) -> SimConfig:
    gpu, nodes = CLUSTERS[cluster]
    prompts, group = BATCH[(cluster, algo)]
    cfg = SimConfig(gpu=gpu, nodes=nodes, model=model, algo=algo, prompts_per_step=prompts,
                    group_size=group, seed=seed)
    n = cfg.max_replicas
    return replace(cfg, sched=SchedulingSpec(actors=n, max_actors=n), **kw)


def sched(cfg: SimConfig, **kw) -> SimConfig:
    return replace(cfg, sched=cfg.sched.model_copy(update=kw))


def run(system: str, cfg: SimConfig, family: str) -> tuple[Workload, list[StepResult]]:
    """`run_system` on the job's workload, cached per configuration."""
    key = f"{system}|{family}|{cfg!r}"
    if key not in _CACHE:
        w = job_workload(cfg, family)
        _CACHE[key] = (w, run_system(system, cfg, w))
    return _CACHE[key]


def _mean(results: list[StepResult], fn: Callable[[StepResult], float]) -> float:
    return float(np.mean([fn(r) for r in results]))


def measure(cfg: SimConfig, family: str, base_cfg: SimConfig | None = None) -> Row:
    """RLHFless (cfg) against verl (base_cfg or cfg), steady state."""
    w, verl_all = run("verl", base_cfg or cfg, family)
    _, ours_all = run("rlhfless", cfg, family)
    verl, ours = warm(verl_all, w), warm(ours_all, w)
    peak = int(max(r.peak_gpus for r in ours))
    parts = bound_parts(cfg, w, ours, cfg.gpus if cfg.pool == "quota" else peak)
    limit = np.array([b.step_s for b in parts])
    verl_limit = bounds(cfg, w, verl, cfg.gpus)
    v_step, v_gpu = _mean(verl, lambda r: r.step_s), _mean(verl, lambda r: r.gpu_s)
    step, gpu_s = _mean(ours, lambda r: r.step_s), _mean(ours, lambda r: r.gpu_s)
    return {
        "speedup": v_step / step,
        "saving": 1.0 - gpu_s / v_gpu,
        "peak_gpus": peak,
        "verl_gen_share": _mean(verl, lambda r: r.extra["gen_share"]),
        "step_over_bound": step / float(limit.mean()),
        "verl_over_bound": v_step / float(verl_limit.mean()),
        "bound_s": float(limit.mean()),
        # the bound's two terms, and RLHFless's step by phase (they sum to step_s): how far
        # each phase runs past what the bound allows is what holds the row back
        "bound_critical_s": float(np.mean([b.critical_s for b in parts])),
        "bound_work_s": float(np.mean([b.work_s for b in parts])),
        **{f"{k}_s": _mean(ours, lambda r, k=k: r.phases.get(k, 0.0)) for k in STEP_PHASES},
        "step_s": step,
        "verl_step_s": v_step,
        "gpu_s": gpu_s,
        "verl_gpu_s": v_gpu,
        "actors": _mean(ours, lambda r: r.actors),
        "learner_gpus": _mean(ours, lambda r: r.extra.get("learner_gpus", 0.0)),
        "rollout_s": _mean(ours, lambda r: r.extra["actual_gen_s"]),
        "split_groups": _mean(ours, lambda r: r.extra.get("split_groups", 0.0)),
        "cold_gpu_s": _mean(ours, lambda r: r.extra["cold_gpu_s"]),
        "idle_gpu_s": _mean(ours, lambda r: r.extra["idle_gpu_s"]),
        "verl_tail10_share": _mean(verl, lambda r: r.extra["tail10_share"]),
    }


HEADLINE_ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("160xH100", "7b", "grpo", "dapo"),
    ("160xH100", "32b", "grpo", "dapo"),
    ("160xH100", "70b", "grpo", "dapo"),
    ("160xH100", "7b", "grpo", "gsm8k"),
    ("160xH100", "7b", "grpo", "longtail"),
    ("16xL40S", "7b", "grpo", "gsm8k"),
    ("16xL40S", "7b", "grpo", "gpqa"),
    ("16xL40S", "7b", "grpo", "lcb"),
)
HEADLINE_KEYS = ("cluster", "model", "algo", "workload", "mode", "speedup", "saving",
                 "peak_gpus", "verl_gen_share", "step_over_bound")


def _headline_runs(seed: int, quick: bool) -> list[tuple[Row, Row]]:
    """(the row's keys, its measurements) for each headline row: quota first, then shared."""
    grid = HEADLINE_ROWS[:1] + HEADLINE_ROWS[5:6] if quick else HEADLINE_ROWS
    return [({"cluster": cluster, "model": model, "algo": algo, "workload": family,
              "mode": mode}, measure(job(cluster, model, algo, seed, pool=mode), family))
            for mode in ("quota", "shared") for cluster, model, algo, family in grid]


def headline(seed: int = 0, quick: bool = False) -> list[Row]:
    """Quota rows first (the headline), then the shared pool."""
    return [{**keys, **{k: m[k] for k in HEADLINE_KEYS[5:]}}
            for keys, m in _headline_runs(seed, quick)]


def headline_details(seed: int = 0, quick: bool = False) -> list[Row]:
    """Everything behind the headline rows (same runs, more columns)."""
    return [{k: v for k, v in keys.items() if k != "algo"} | m
            for keys, m in _headline_runs(seed, quick)]


def testbed(seed: int = 0, quick: bool = False) -> list[Row]:
    models = ("7b",) if quick else ("3b", "7b")
    families = ("gsm8k",) if quick else ("gsm8k", "gpqa", "lcb")
    rows: list[Row] = []
    for model in models:
        for algo in ("grpo", "ppo"):
            for family in families:
                m = measure(job("16xL40S", model, algo, seed), family)
                rows.append({"model": model, "algo": algo, "workload": family,
                             "speedup": m["speedup"], "saving": m["saving"],
                             "paper_speedup": PAPER["speedup"],
                             "paper_saving": PAPER["saving"],
                             "verl_gen_share": m["verl_gen_share"],
                             "step_over_bound": m["step_over_bound"],
                             "actors": m["actors"], "learner_gpus": m["learner_gpus"],
                             "peak_gpus": m["peak_gpus"]})
    return rows


def planner(seed: int = 0, quick: bool = False) -> list[Row]:
    """Per steady-state step: the rollout time the plan predicted, the same corrected by the
    recent actual/planned ratio (what the learner and prewarm are timed on), the actual."""
    rows: list[Row] = []
    for model in ("7b",) if quick else ("7b", "70b"):
        cfg = job("160xH100", model, "grpo", seed)
        w, results = run("rlhfless", cfg, "dapo")
        for r in warm(results, w):
            planned, actual = r.extra["planned_gen_s"], r.extra["actual_gen_s"]
            corrected = planned * r.extra["rollout_scale"]
            rows.append({"model": model, "step": r.step, "actors": r.actors,
                         "planned_rollout_s": planned, "corrected_rollout_s": corrected,
                         "actual_rollout_s": actual,
                         "planned_error": planned / actual - 1.0,
                         "corrected_error": corrected / actual - 1.0})
    return rows


def coldstart(seed: int = 0, quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    for model in ("7b",) if quick else ("7b", "70b"):
        base = job("160xH100", model, "grpo", seed)
        for name, variant in COLD_STARTS.items():
            m = measure(base.with_cold_start(name), "dapo", base)
            rows.append({"model": model, "cold_start": name, "assumption": variant.note,
                         "speedup": m["speedup"], "saving": m["saving"],
                         "cold_gpu_s": m["cold_gpu_s"], "step_over_bound":
                         m["step_over_bound"]})
    return rows


# The default with one thing changed (SchedulingSpec fields, or SimConfig fields).
ABLATIONS: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "default": ({}, {}),
    "barrier step (reference, then trainer)": ({}, {"step_mode": "barrier"}),
    "hand-off cut at τ 0.7": ({"tau": 0.7}, {}),
    "one global cut at τ 0.7": ({"tau": 0.7}, {"cut_mode": "global"}),
    "whole groups (no sample split)": ({}, {"split_groups": False}),
    "bins timed on their own longest sample (no floor)": ({}, {"runaway_floor": False}),
    "λ over every plan (no 2% time slack)": ({}, {"time_slack": None}),
    "no length prediction (round-robin)": ({"length_prediction": False,
                                            "assignment": "round-robin"}, {}),
    "no prewarm": ({"prewarm": False}, {}),
    "no dedup prefill": ({"dedup_prefill": False}, {}),
    "mean planner inputs (no max, no KV term)": ({}, {"planner_inputs": "mean"}),
    "learner reuses its own log-probs": ({}, {"learner_logprob_pass": False}),
    "shared pool instead of quota": ({}, {"pool": "shared"}),
}


def ablation(seed: int = 0, quick: bool = False) -> list[Row]:
    base = job("160xH100", "7b", "grpo", seed)
    names = list(ABLATIONS)[:3] if quick else list(ABLATIONS)
    rows: list[Row] = []
    for name in names:
        spec, top = ABLATIONS[name]
        cfg = replace(sched(base, **spec), **top)
        m = measure(cfg, "dapo", base)
        rows.append({"variant": name, "speedup": m["speedup"], "saving": m["saving"],
                     "step_s": m["step_s"], "gpu_s": m["gpu_s"], "actors": m["actors"],
                     "peak_gpus": m["peak_gpus"], "step_over_bound": m["step_over_bound"]})
    return rows


def frontier(seed: int = 0, quick: bool = False) -> list[Row]:
    base = job("160xH100", "7b", "grpo", seed)
    ns = (40, 80, 120) if quick else (20, 40, 60, 80, 100, 120, 160)
    rows: list[Row] = []
    for n in ns:
        m = measure(sched(base, cost_aware=False, actors=n), "dapo", base)
        rows.append({"kind": "fixed N", "n": n, **_point(m)})
    for lam in (0.5,) if quick else (0.0, 0.25, 0.5, 0.75, 1.0):
        m = measure(sched(base, lam=lam), "dapo", base)
        rows.append({"kind": f"chosen λ={lam}", "n": None, **_point(m)})
    w, verl = run("verl", base, "dapo")
    rows.append({"kind": "verl", "n": base.max_replicas,
                 "step_s": _mean(warm(verl, w), lambda r: r.step_s),
                 "gpu_s": _mean(warm(verl, w), lambda r: r.gpu_s), "speedup": 1.0,
                 "saving": 0.0, "actors": base.max_replicas, "peak_gpus": base.gpus})
    return rows


def _point(m: Row) -> Row:
    return {k: m[k] for k in ("step_s", "gpu_s", "speedup", "saving", "actors", "peak_gpus")}


def sensitivity(seed: int = 0, quick: bool = False) -> list[Row]:
    base = job("160xH100", "7b", "grpo", seed)
    rows: list[Row] = []
    for tau in (0.7, 1.0) if quick else (0.5, 0.7, 0.8, 0.9, 1.0):
        m = measure(sched(base, tau=tau), "dapo", base)
        rows.append({"param": "tau", "value": tau, **_point(m)})
    return rows


EXPERIMENTS: dict[str, Callable[..., list[Row]]] = {
    "headline": headline,
    "headline_details": headline_details,
    "testbed": testbed,
    "planner": planner,
    "coldstart": coldstart,
    "ablation": ablation,
    "frontier": frontier,
    "sensitivity": sensitivity,
}
