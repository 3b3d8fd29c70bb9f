"""Figures for the experiments (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Row = dict[str, object]
_VARIANTS = ("default", "speed", "cost")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _two_panels(title: str):
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    fig.suptitle(title)
    a.set_ylabel("speedup over verl (×)")
    b.set_ylabel("GPU-second saving vs verl")
    a.axhline(1.0, color="grey", lw=0.8)
    b.axhline(0.0, color="grey", lw=0.8)
    return fig, a, b


def plot_paper(rows: list[Row], path: Path) -> Path:
    fig, a, b = _two_panels("RLHFless vs verl (long-tailed lengths)")
    labels = [f"{r['cluster']}\n{r['model']} {r['algo']}" for r in rows]
    x = range(len(rows))
    width = 0.2
    for k, name in enumerate(("rlhfuse", *_VARIANTS)):
        off = [i + (k - 1.5) * width for i in x]
        a.bar(off, [r[f"{name}_speedup"] for r in rows], width, label=name)
        b.bar(off, [r[f"{name}_saving"] for r in rows], width, label=name)
    for ax in (a, b):
        ax.set_xticks(list(x), labels, fontsize=7)
    a.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(rows: list[Row], key: str, path: Path, title: str) -> Path:
    fig, a, b = _two_panels(title)
    xs = [r[key] for r in rows]
    for name in ("rlhfuse", *_VARIANTS):
        a.plot(xs, [r[f"{name}_speedup"] for r in rows], "o-", label=name)
        b.plot(xs, [r[f"{name}_saving"] for r in rows], "o-", label=name)
    for ax in (a, b):
        ax.set_xlabel(key)
    a.legend(fontsize=8)
    return _save(fig, path)


def plot_ablation(rows: list[Row], path: Path) -> Path:
    fig, a, b = _two_panels("Ablation: one mechanism off at a time")
    names = [str(r["variant"]) for r in rows]
    a.barh(names, [r["speedup"] for r in rows])
    b.barh(names, [r["gpu_s_saving"] for r in rows])
    a.axvline(1.0, color="grey", lw=0.8)
    b.axvline(0.0, color="grey", lw=0.8)
    a.set_xlabel("speedup over verl (×)")
    b.set_xlabel("GPU-second saving vs verl")
    a.set_ylabel("")
    b.set_ylabel("")
    b.set_yticks([])
    return _save(fig, path)


def plot_sensitivity(rows: list[Row], path: Path) -> Path:
    by: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by[str(r["param"])].append(r)
    cols = 4
    n_rows = -(-len(by) // cols)
    fig, grid = plt.subplots(n_rows, cols, figsize=(3.6 * cols, 3.2 * n_rows), squeeze=False)
    axes = grid.ravel()
    for ax in axes[len(by):]:
        ax.set_visible(False)
    for ax, (param, rs) in zip(axes, by.items(), strict=False):
        xs = [str(r["value"]) for r in rs]
        ax.plot(xs, [r["speedup"] for r in rs], "o-", label="speedup")
        ax.plot(xs, [r["gpu_s_saving"] for r in rs], "s--", label="GPU-s saving")
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_title(param)
    axes[0].legend(fontsize=8)
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
        ax.plot(r["step_s"], r["gpu_s"], "*", ms=14, color=f"C{k + 1}",
                label=f"{r['kind']} (N≈{r['actors']:.0f})")
    base = next(r for r in rows if r["kind"] == "verl")
    ax.plot(base["step_s"], base["gpu_s"], "X", ms=12, color="k", label="verl")
    ax.set_xlabel("step time (s)")
    ax.set_ylabel("GPU-seconds per step")
    ax.set_title("Cost–speed frontier over the actor count N")
    ax.legend(fontsize=8)
    return _save(fig, path)
