"""The run report's figures, drawn from metrics.jsonl rows as inline SVG (matplotlib).

Every figure is a function of the rows alone and returns SVG markup with its ids prefixed,
so several can sit in one HTML page without clashing; text is drawn as paths (no fonts to
fetch). A figure whose data the run does not have returns None.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from rlhfless.cost.split import USES  # noqa: E402
from rlhfless.driver.plots import STAGE_COLOURS  # noqa: E402

Row = dict[str, Any]
USE_COLOURS = {"busy": "#4c72b0", "cold_start": "#c44e52", "prewarm_wait": "#dd8452",
               "keep_alive_idle": "#937860"}
_PALETTE = plt.get_cmap("tab10").colors


def colour(stage: str) -> str | tuple[float, ...]:
    if stage in STAGE_COLOURS:
        return STAGE_COLOURS[stage]
    return _PALETTE[sum(map(ord, stage)) % len(_PALETTE)]


def to_svg(fig: plt.Figure, name: str, label: str) -> str:
    """The figure as an <svg> element whose ids start with `name`."""
    for ax in fig.axes:
        if ax.get_xlabel() == "step":  # steps are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": name}):
        fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{name}-\1"', svg)
    svg = re.sub(r'(href="#)([^"]+)"', rf'\1{name}-\2"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{name}-\1)", svg)
    return svg.replace("<svg ", f'<svg role="img" aria-label="{label}" ', 1)


def _steps(rows: Sequence[Row]) -> list[int]:
    return [int(r["step"]) for r in rows]


def _has(rows: Sequence[Row], key: str) -> bool:
    return any(key in r for r in rows)


def _stages(rows: Iterable[Row], prefix: str) -> list[str]:
    found = {k[len(prefix):] for r in rows for k in r if k.startswith(prefix)}
    order = list(STAGE_COLOURS)
    return sorted((s for s in found if "/" not in s),
                  key=lambda s: (order.index(s) if s in order else len(order), s))


def _stacked(ax: plt.Axes, rows: Sequence[Row], keys: dict[str, str],
             colours: dict[str, Any]) -> None:
    steps = _steps(rows)
    bottom = [0.0] * len(rows)
    for label, key in keys.items():
        values = [float(r.get(key, 0.0)) for r in rows]
        if any(values):
            ax.bar(steps, values, bottom=bottom, color=colours[label], label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xlabel("step")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.set_ylim(0, max(bottom) * 1.3 or 1.0)  # headroom: the legend must not hide bars
        ax.legend(fontsize=8, ncol=2)


def reward_and_length(rows: Sequence[Row]) -> str:
    steps = _steps(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    mean = [float(r.get("reward/mean", 0.0)) for r in rows]
    left.plot(steps, mean, marker="o", label="mean")
    if _has(rows, "reward/std"):
        std = [float(r.get("reward/std", 0.0)) for r in rows]
        left.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                          [m + s for m, s in zip(mean, std, strict=True)], alpha=0.2,
                          label="± std")
    if _has(rows, "reward/max"):
        left.plot(steps, [float(r.get("reward/max", 0.0)) for r in rows], alpha=0.5,
                  label="max")
    left.set(title="Reward", xlabel="step", ylabel="reward")
    for key, label in (("response_length/mean", "mean"), ("response_length/max", "max")):
        if _has(rows, key):
            right.plot(steps, [float(r.get(key, 0.0)) for r in rows], marker=".", label=label)
    right.set(title="Response length", xlabel="step", ylabel="tokens")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return to_svg(fig, "reward", "Reward and response length per step")


def cost_per_stage(rows: Sequence[Row]) -> str:
    stages = _stages(rows, "cost/gpu_seconds/")
    priced = _stages(rows, "cost/dollars/")
    fig, axes = plt.subplots(1, 2 if priced else 1, figsize=(10 if priced else 5.5, 3.4),
                             squeeze=False)
    colours = {s: colour(s) for s in stages}
    _stacked(axes[0, 0], rows, {s: f"cost/gpu_seconds/{s}" for s in stages}, colours)
    axes[0, 0].set(title="GPU-seconds per stage", ylabel="GPU-seconds")
    if priced:
        _stacked(axes[0, 1], rows, {s: f"cost/dollars/{s}" for s in priced}, colours)
        axes[0, 1].set(title="Dollars per stage", ylabel="$")
    return to_svg(fig, "cost", "GPU-seconds and dollars per stage and step")


def split(rows: Sequence[Row]) -> str | None:
    if not _has(rows, "cost/split/busy"):
        return None
    fig, ax = plt.subplots(figsize=(10, 3.4))
    _stacked(ax, rows, {u: f"cost/split/{u}" for u in USES}, USE_COLOURS)
    ax.set(title="Where the GPU-seconds go", ylabel="GPU-seconds")
    return to_svg(fig, "split", "GPU-seconds by use per step")


def timeline(rows: Sequence[Row], last: int = 3) -> str | None:
    shown = [r for r in rows if r.get("timeline")][-last:]
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 1.4 + 1.5 * len(shown)),
                             squeeze=False)
    order = list(STAGE_COLOURS)
    for ax, row in zip(axes[:, 0], shown, strict=True):
        step_s = float(row.get("timing_s/step", 0.0)) or max(
            float(t["end"]) for t in row["timeline"])
        # (label, [(start, end, cold start, stage)]) for alive lanes, cold None when busy.
        lanes: list[tuple[str, list[tuple[float, float, float | None, str]]]] = []
        instances = sorted({(str(t["stage"]), str(t["instance"])) for t in row["timeline"]},
                           key=lambda si: (order.index(si[0]) if si[0] in order else 9, si))
        for stage, name in instances:
            lanes.append((f"{name} alive", [
                (max(0.0, float(t["start"])), min(step_s, float(t["end"])),
                 float(t["cold_start"]) if float(t["start"]) >= 0 else 0.0, stage)
                for t in row["timeline"] if t["instance"] == name]))
        for stage in sorted({str(q["stage"]) for q in row.get("requests", [])},
                            key=lambda s: order.index(s) if s in order else 9):
            lanes.append((f"{stage} busy", [(float(q["start"]), float(q["end"]), None, stage)
                                            for q in row["requests"] if q["stage"] == stage]))
        for lane, (_, spans) in enumerate(lanes):
            for start, end, cold, stage in spans:
                if cold is None:  # a request in flight, on its stage's busy lane
                    ax.barh(lane, end - start, left=start, color=colour(stage), height=0.5,
                            hatch="///", edgecolor="white")
                    continue
                ax.barh(lane, end - start, left=start, color=colour(stage), height=0.7,
                        alpha=0.55)
                if cold > 0:
                    ax.barh(lane, min(cold, end - start), left=start, color="black",
                            alpha=0.35, height=0.7)
        ax.set_yticks(range(len(lanes)), [name for name, _ in lanes], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, step_s)
        ax.set_title(f"step {row['step']}: instances alive (dark: cold start) and stage "
                     "requests in flight (hatched)", fontsize=9)
    axes[-1, 0].set_xlabel("seconds since the step started")
    return to_svg(fig, "timeline", "Function instances alive and busy over the last steps")


def scheduling(rows: Sequence[Row]) -> str | None:
    has_n, has_err = _has(rows, "sched/actors"), _has(rows, "sched/pred_mae_tokens")
    if not (has_n or has_err):
        return None
    steps = _steps(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    if has_n:
        left.step(steps, [float(r.get("sched/actors", 0)) for r in rows], where="mid",
                  label="N chosen")
        left.plot(steps, [float(r.get("sched/warm_actors", 0)) for r in rows], "o",
                  alpha=0.5, label="warm at plan time")
    left.set(title="Actor functions per step", xlabel="step", ylabel="actors")
    if has_err:
        right.plot(steps, [r.get("sched/pred_mae_tokens") for r in rows], marker="o",
                   label="MAE (tokens)")
        right.set(ylabel="mean absolute error, tokens")
        if _has(rows, "sched/pred_spearman"):
            twin = right.twinx()
            twin.plot(steps, [r.get("sched/pred_spearman") for r in rows], color="#55a868",
                      marker="s", label="Spearman ρ")
            twin.set(ylabel="Spearman ρ", ylim=(-1.05, 1.05))
            twin.legend(fontsize=8, loc="lower right")
    right.set(title="Length-prediction error", xlabel="step")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    return to_svg(fig, "sched", "Actors chosen and length-prediction error per step")


def serverful(rows: Sequence[Row]) -> str | None:
    if not _has(rows, "cost/serverful/gpu_seconds"):
        return None
    steps = _steps(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    width = 0.4
    left.bar([s - width / 2 for s in steps], [float(r.get("cost/gpu_seconds", 0)) for r in rows],
             width, label="serverless (billed)", color="#4c72b0")
    left.bar([s + width / 2 for s in steps],
             [float(r.get("cost/serverful/gpu_seconds", 0)) for r in rows], width,
             label="serverful (same timings)", color="#c44e52")
    held = [float(r.get("cost/serverful/gpu_seconds", 0)) for r in rows]
    left.set(title="Serverless vs serverful", xlabel="step", ylabel="GPU-seconds",
             ylim=(0, max(held) * 1.3 or 1.0))
    left.legend(fontsize=8, ncol=2)
    left.grid(axis="y", alpha=0.3)
    right.plot(steps, [r.get("cost/saving/ratio") for r in rows], marker="o",
               label="saving vs serverful")
    if _has(rows, "cost/tail/share"):
        right.plot(steps, [r.get("cost/tail/share") for r in rows], marker="s",
                   label="rollout tail share")
    right.set(title="Saving and rollout tail", xlabel="step", ylabel="fraction",
              ylim=(0, 1.25))
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    return to_svg(fig, "serverful", "Serverless versus serverful GPU-seconds per step")
