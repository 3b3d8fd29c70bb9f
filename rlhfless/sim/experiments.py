"""The experiments: each returns rows (dicts) that the CLI prints, saves and plots.

paper        speedup and GPU-second saving vs verl: 3B/7B (16 L40S, the paper's physical
             testbed) and 3B/7B/70B (20 nodes × 8 H100, its simulated cluster), GRPO and
             PPO, long-tailed lengths; plus a tail-heaviness sweep at 20 nodes.
ablation     RLHFless with each mechanism switched off in turn (20 nodes, GRPO).
sensitivity  λ, τ, EWMA α, and the cold start / GPU pool assumptions.
frontier     step time vs GPU-seconds over fixed actor counts N, with the point the
             cost-aware policy picks and the baseline marked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from rlhfless.api.spec import SchedulingSpec
from rlhfless.sim.config import SimConfig
from rlhfless.sim.hardware import Overheads
from rlhfless.sim.results import summarise
from rlhfless.sim.runner import job_workload, run_system

Row = dict[str, object]

# Batches: GRPO 16 samples per prompt (DAPO-style); PPO one sample per prompt.
_BATCH = {  # (cluster, algo) -> (prompts_per_step, group_size)
    ("16xL40S", "grpo"): (128, 16),
    ("16xL40S", "ppo"): (2048, 1),
    ("160xH100", "grpo"): (1024, 16),
    ("160xH100", "ppo"): (8192, 1),
}
_CLUSTERS = {"16xL40S": ("l40s", 2), "160xH100": ("h100", 20)}

# RLHFless configurations compared with the baselines.  "default" is SchedulingSpec's
# defaults as the driver runs them; "speed" and "cost" are the two ends of the trade-off the
# ablation and frontier point to (see benchmarks/results/README.md).
VARIANTS: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "default": ({}, {}),
    "speed": ({}, {"cut_migrate": False, "cost_aware": False}),
    "cost": ({}, {"lam": 0.25, "tau": 0.9}),
}


def job(cluster: str, model: str, algo: str, seed: int, **kw) -> SimConfig:
    gpu, nodes = _CLUSTERS[cluster]
    prompts, group = _BATCH[(cluster, algo)]
    cfg = SimConfig(gpu=gpu, nodes=nodes, model=model, algo=algo, prompts_per_step=prompts,
                    group_size=group, seed=seed)
    n = cfg.max_replicas
    sched = SchedulingSpec(actors=n, max_actors=n)
    return replace(cfg, sched=sched, **kw)


def variant(cfg: SimConfig, name: str) -> SimConfig:
    top, sched = VARIANTS[name]
    return replace(cfg, sched=cfg.sched.model_copy(update=sched), **top)


def _row(label: dict, cfg: SimConfig, family: str = "longtail", **overrides) -> Row:
    w = job_workload(cfg, family, **overrides)
    skip = _warm_skip(cfg, w)
    base = summarise(run_system("verl", cfg, w), skip)
    fuse = summarise(run_system("rlhfuse", cfg, w), skip)
    row: Row = {**label, "verl_step_s": base.step_s, "verl_gpu_s": base.gpu_s,
                "rlhfuse_speedup": base.step_s / fuse.step_s,
                "rlhfuse_saving": 1 - fuse.gpu_s / base.gpu_s}
    for name in VARIANTS:
        s = summarise(run_system("rlhfless", variant(cfg, name), w), skip)
        row[f"{name}_speedup"] = base.step_s / s.step_s
        row[f"{name}_saving"] = 1 - s.gpu_s / base.gpu_s
        row[f"{name}_actors"] = s.actors
    row["tail_p99_over_median"] = w.tail_ratio()
    return row


def paper(seed: int = 0, quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    grid = [("16xL40S", m) for m in ("3b", "7b")] + [("160xH100", m) for m in ("3b", "7b", "70b")]
    if quick:
        grid = [("16xL40S", "7b"), ("160xH100", "70b")]
    for cluster, model in grid:
        for algo in ("grpo", "ppo"):
            cfg = job(cluster, model, algo, seed)
            rows.append(_row({"cluster": cluster, "model": model, "algo": algo}, cfg))
    return rows


def tail_sweep(seed: int = 0, model: str = "70b", quick: bool = False) -> list[Row]:
    """Same job, prompt-level length spread σ from mild to extreme (20 nodes, GRPO)."""
    cfg = job("160xH100", model, "grpo", seed)
    sigmas = (0.3, 0.8, 1.2) if quick else (0.2, 0.5, 0.8, 1.1, 1.4)
    return [_row({"model": model, "sigma": sg}, cfg, sigma=sg) for sg in sigmas]


ABLATIONS: dict[str, dict[str, object]] = {
    "full": {},
    "no dedup prefill": {"dedup_prefill": False},
    "no length-aware assignment": {"length_prediction": False, "assignment": "round-robin"},
    "no cut-and-migrate": {"cut_migrate": False},
    "no cost-aware scaling": {"cost_aware": False},
    "no prewarm": {"prewarm": False},
    "all off": {"dedup_prefill": False, "length_prediction": False,
                "assignment": "round-robin", "cut_migrate": False, "cost_aware": False,
                "prewarm": False},
}


def _rlhfless_only(cfg: SimConfig, w, base) -> Row:
    s = summarise(run_system("rlhfless", cfg, w), _warm_skip(cfg, w))
    return {"step_s": s.step_s, "gpu_s": s.gpu_s, "speedup": base.step_s / s.step_s,
            "gpu_s_saving": 1 - s.gpu_s / base.gpu_s, "actors": s.actors,
            "peak_gpus": s.peak_gpus}


def _warm_skip(cfg: SimConfig, w) -> int:
    return len(list(w.steps(cfg.prompts_per_step))) // w.epochs if w.epochs > 1 else 0


def _baseline(cfg: SimConfig, w):
    return summarise(run_system("verl", cfg, w), _warm_skip(cfg, w))


# The default (stream cut, kv-aware planner inputs) against what `rlhfless/driver.py` does
# today and the other cut (SimConfig fields).
ALTERNATIVES: dict[str, dict[str, object]] = {
    "global cut (one cut, no barrier)": {"cut_mode": "global"},
    "barrier cut (driver today)": {"cut_mode": "barrier"},
    "driver planner inputs (mean lmax, no ctx)": {"planner_inputs": "driver"},
    "driver today (barrier + driver inputs)": {"cut_mode": "barrier",
                                               "planner_inputs": "driver"},
}


def ablation(seed: int = 0, model: str = "70b", quick: bool = False) -> list[Row]:
    """The default configuration with one mechanism off at a time, then the alternatives."""
    cfg = job("160xH100", model, "grpo", seed)
    w = job_workload(cfg)
    base = _baseline(cfg, w)
    rows = []
    for name, off in ABLATIONS.items():
        c = replace(cfg, sched=cfg.sched.model_copy(update=off))
        rows.append({"variant": name, **_rlhfless_only(c, w, base)})
    for name, alt in ALTERNATIVES.items():
        rows.append({"variant": name, **_rlhfless_only(replace(cfg, **alt), w, base)})
    return rows


def sensitivity(seed: int = 0, model: str = "70b", quick: bool = False) -> list[Row]:
    cfg = job("160xH100", model, "grpo", seed)
    w = job_workload(cfg)
    base = _baseline(cfg, w)
    grid: list[tuple[str, float | str, Callable[[SimConfig], SimConfig]]] = []

    def sched(**kw) -> Callable[[SimConfig], SimConfig]:
        return lambda c: replace(c, sched=c.sched.model_copy(update=kw))

    lams = (0.0, 0.5, 1.0) if quick else (0.0, 0.25, 0.5, 0.75, 1.0)
    taus = (0.5, 0.7, 1.0) if quick else (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    alphas = (0.2, 0.5, 1.0) if quick else (0.1, 0.3, 0.5, 0.7, 1.0)
    grid += [("lambda", x, sched(lam=x)) for x in lams]
    grid += [("tau", x, sched(tau=x)) for x in taus]
    grid += [("ewma_alpha", x, sched(ewma_alpha=x)) for x in alphas]
    for init in (2.0, 10.0, 30.0, 60.0):
        grid.append(("init_s", init, lambda c, i=init: replace(
            c, over=Overheads(actor_init_s=i, learner_init_s=i))))
    grid += [("pool", p, lambda c, p=p: replace(c, pool=p)) for p in ("shared", "quota")]
    rows = [{"param": name, "value": value, **_rlhfless_only(fn(cfg), w, base)}
            for name, value, fn in grid]
    # The baseline's own knob: verl with more KV cache for vLLM (needs optimizer offload,
    # whose transfer time is not charged to it here).
    for util in (0.6, 0.8):
        b = _baseline(replace(cfg, colocated_mem_util=util), w)
        rows.append({"param": "verl_mem_util", "value": util, **_rlhfless_only(cfg, w, b)})
    # Both systems under a decode law without the KV-read (context) term.
    for law in ("roofline", "batch-only"):
        c = replace(cfg, decode_law=law)
        rows.append({"param": "decode_law", "value": law,
                     **_rlhfless_only(c, w, _baseline(c, w))})
    return rows


def frontier(seed: int = 0, model: str = "70b", quick: bool = False) -> list[Row]:
    """Fixed N (cost-aware off) traced against the policy's own pick for λ = 0, 0.5, 1."""
    cfg = job("160xH100", model, "grpo", seed)
    w = job_workload(cfg)
    base = _baseline(cfg, w)
    top = cfg.max_replicas
    ns = sorted({max(1, round(top * f)) for f in (
        (0.1, 0.25, 0.5, 1.0) if quick else (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0))})
    rows: list[Row] = []
    for n in ns:
        c = replace(cfg, sched=cfg.sched.model_copy(update={"cost_aware": False, "actors": n}))
        rows.append({"kind": "fixed N", "n": n, **_rlhfless_only(c, w, base)})
    for lam in (0.0, 0.5, 1.0):
        c = replace(cfg, sched=cfg.sched.model_copy(update={"lam": lam}))
        rows.append({"kind": f"chosen λ={lam}", "n": None, **_rlhfless_only(c, w, base)})
    rows.append({"kind": "verl", "n": cfg.max_replicas, "step_s": base.step_s,
                 "gpu_s": base.gpu_s, "speedup": 1.0, "gpu_s_saving": 0.0,
                 "actors": cfg.max_replicas, "peak_gpus": cfg.gpus})
    return rows


EXPERIMENTS: dict[str, Callable[..., list[Row]]] = {
    "paper": paper,
    "tails": tail_sweep,
    "ablation": ablation,
    "sensitivity": sensitivity,
    "frontier": frontier,
}
