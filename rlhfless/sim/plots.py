"""Figures for the experiments (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhfless.sim.results import STEP_PHASES  # noqa: E402

Row = dict[str, object]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _two_panels(title: str):
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
    fig.suptitle(title)
    a.set_ylabel("speed-up over verl (×)")
    b.set_ylabel("GPU-second saving vs verl")
    a.axhline(1.0, color="grey", lw=0.8)
    b.axhline(0.0, color="grey", lw=0.8)
    return fig, a, b


def _bars(rows: list[Row], label, groups: dict[str, list[Row]], title: str, path: Path,
          goals: tuple[float, float] | None = None) -> Path:
    fig, a, b = _two_panels(title)
    names = list(groups)
    width = 0.8 / max(1, len(names))
    base = groups[names[0]]
    x = range(len(base))
    for k, name in enumerate(names):
        off = [i + (k - (len(names) - 1) / 2) * width for i in x]
        a.bar(off, [r["speedup"] for r in groups[name]], width, label=name)
        b.bar(off, [r["saving"] for r in groups[name]], width, label=name)
    for ax in (a, b):
        ax.set_xticks(list(x), [label(r) for r in base], fontsize=7)
    if goals:
        a.axhline(goals[0], color="C3", ls="--", lw=0.8, label="goal")
        b.axhline(goals[1], color="C3", ls="--", lw=0.8, label="goal")
    a.legend(fontsize=8)
    return _save(fig, path)


def plot_headline(rows: list[Row], path: Path) -> Path:
    by: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by[str(r["mode"])].append(r)
    return _bars(rows, lambda r: f"{r['cluster']}\n{r['model']} {r['workload']}", by,
                 "RLHFless vs verl-like (quota = same peak GPUs; shared = larger pool)", path)


def plot_details(rows: list[Row], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 4.4))
    quota = [r for r in rows if r["mode"] == "quota"]
    x = range(len(quota))
    bottom = [0.0] * len(quota)
    for phase in STEP_PHASES:  # RLHFless's step by phase, in units of the bound
        part = [float(r[f"{phase}_s"]) / float(r["bound_s"]) for r in quota]
        ax.bar([i - 0.2 for i in x], part, 0.4, bottom=bottom, label=f"RLHFless {phase}")
        bottom = [b + p for b, p in zip(bottom, part, strict=True)]
    ax.bar([i + 0.2 for i in x], [r["verl_over_bound"] for r in quota], 0.4, label="verl-like",
           color="grey")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.3, color="C3", ls="--", lw=0.8, label="goal 1.3×")
    ax.set_xticks(list(x), [f"{r['cluster']}\n{r['model']} {r['workload']}" for r in quota],
                  fontsize=7)
    ax.set_ylabel("step time / lower bound")
    ax.set_title("Distance to the lower bound (quota mode)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_testbed(rows: list[Row], path: Path) -> Path:
    by: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by[str(r["algo"])].append(r)
    return _bars(rows, lambda r: f"{r['model']} {r['workload']}", by,
                 "Paper testbed: 16 L40S (quota); dashed: the paper's 1.35× / 44.8%", path,
                 goals=(1.35, 0.448))


def plot_planner(rows: list[Row], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for k, model in enumerate(sorted({str(r["model"]) for r in rows})):
        rs = [r for r in rows if r["model"] == model]
        ax.plot([r["actual_rollout_s"] for r in rs], [r["planned_rollout_s"] for r in rs], "o",
                color=f"C{k}", label=f"{model} planned")
        ax.plot([r["actual_rollout_s"] for r in rs], [r["corrected_rollout_s"] for r in rs],
                "x", color=f"C{k}", label=f"{model} corrected")
    lo = min(min(r["actual_rollout_s"] for r in rows), min(r["planned_rollout_s"] for r in rows))
    hi = max(max(r["actual_rollout_s"] for r in rows), max(r["planned_rollout_s"] for r in rows))
    for f, style in ((1.0, "-"), (0.85, ":"), (1.15, ":")):
        ax.plot([lo, hi], [f * lo, f * hi], style, color="grey", lw=0.8)
    ax.set_xlabel("actual rollout time (s)")
    ax.set_ylabel("predicted rollout time (s)")
    ax.set_title("Planner accuracy per step (dotted: ±15%)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_coldstart(rows: list[Row], path: Path) -> Path:
    by: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by[str(r["cold_start"])].append(r)
    return _bars(rows, lambda r: str(r["model"]), by, "Cold-start variants (quota)", path)


def plot_ablation(rows: list[Row], path: Path) -> Path:
    fig, a, b = _two_panels("Ablation: 7B DAPO-like, 20 nodes × 8 H100, quota")
    names = [str(r["variant"]) for r in rows]
    a.barh(names, [r["speedup"] for r in rows])
    b.barh(names, [r["saving"] for r in rows])
    a.axvline(1.0, color="grey", lw=0.8)
    b.axvline(0.0, color="grey", lw=0.8)
    a.set_xlabel("speed-up over verl (×)")
    b.set_xlabel("GPU-second saving vs verl")
    a.set_ylabel("")
    b.set_ylabel("")
    b.set_yticks([])
    return _save(fig, path)


def plot_frontier(rows: list[Row], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    fixed = [r for r in rows if r["kind"] == "fixed N"]
    ax.plot([r["step_s"] for r in fixed], [r["gpu_s"] for r in fixed], "o-", color="C0",
            label="RLHFless, fixed N")
    for r in fixed:
        ax.annotate(f"N={r['n']}", (r["step_s"], r["gpu_s"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    for k, r in enumerate(x for x in rows if str(x["kind"]).startswith("chosen")):
        ax.plot(r["step_s"], r["gpu_s"], "*", ms=12, color=f"C{k + 1}",
                label=f"{r['kind']} (N≈{r['actors']:.0f})")
    base = next(r for r in rows if r["kind"] == "verl")
    ax.plot(base["step_s"], base["gpu_s"], "X", ms=12, color="k", label="verl")
    ax.set_xlabel("step time (s)")
    ax.set_ylabel("GPU-seconds per step")
    ax.set_title("7B DAPO-like, quota: cost–speed frontier over the actor count")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_sensitivity(rows: list[Row], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [str(r["value"]) for r in rows]
    ax.plot(xs, [r["speedup"] for r in rows], "o-", label="speed-up")
    ax.plot(xs, [r["saving"] for r in rows], "s--", label="GPU-s saving")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_xlabel("τ (hand-off cut)")
    ax.set_title("7B DAPO-like, quota: the cut's τ")
    ax.legend(fontsize=8)
    return _save(fig, path)
