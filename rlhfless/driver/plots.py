"""PNG plots of a run, drawn from metrics.jsonl: reward, cost per stage, instance timeline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGE_COLOURS = {"actor": "#4c72b0", "reward": "#c44e52", "scorer": "#dd8452",
                 "learner": "#55a868"}


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reward(rows: list[dict], path: Path) -> Path:
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["reward/mean"] for r in rows], marker="o", label="mean reward")
    ax.plot(steps, [r["reward/max"] for r in rows], alpha=0.4, label="max reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("Reward per step")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_gpu_seconds(rows: list[dict], path: Path) -> Path:
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(rows)
    for stage, colour in STAGE_COLOURS.items():
        values = [float(r.get(f"cost/gpu_seconds/{stage}", 0.0)) for r in rows]
        if any(values):
            ax.bar(steps, values, bottom=bottom, color=colour, label=stage)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xlabel("step")
    ax.set_ylabel("GPU-seconds")
    ax.set_title("GPU-seconds per stage and step")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _lane_label(row: dict, instance: str) -> str:
    """The instance's name, and the GPUs it held (e.g. "actor-3 · GPU 2,3")."""
    devices = next((t.get("gpus") for t in row["timeline"] if t["instance"] == instance), None)
    return f"{instance} · GPU {','.join(map(str, devices))}" if devices else instance


def plot_timeline(rows: list[dict], path: Path, last: int = 3) -> Path:
    """Function instances over the last few steps, one lane per instance (labelled with the
    GPUs it held): alive (light), serving a request (dark), cold start (hatched)."""
    shown = rows[-last:]
    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 1.2 + 1.4 * len(shown)),
                             squeeze=False)
    order = list(STAGE_COLOURS)
    for ax, row in zip(axes[:, 0], shown, strict=True):
        step_s = float(row["timing_s/step"])
        lanes = sorted({t["instance"] for t in row["timeline"]},
                       key=lambda name: (order.index(name.rsplit("-", 1)[0])
                                         if name.rsplit("-", 1)[0] in order else 9, name))
        for lane, name in enumerate(lanes):
            for t in (t for t in row["timeline"] if t["instance"] == name):
                colour = STAGE_COLOURS.get(str(t["stage"]), "grey")
                start, end = max(0.0, float(t["start"])), min(step_s, float(t["end"]))
                ax.barh(lane, end - start, left=start, color=colour, alpha=0.3, height=0.7)
                cold = min(float(t["cold_start"]), end - start)
                if float(t["start"]) >= 0 and cold > 0:
                    ax.barh(lane, cold, left=start, color="none", edgecolor=colour,
                            hatch="////", height=0.7, linewidth=0)
                for b_start, b_end in t.get("busy", []):
                    b_start, b_end = max(0.0, float(b_start)), min(step_s, float(b_end))
                    if b_end > b_start:
                        ax.barh(lane, b_end - b_start, left=b_start, color=colour, height=0.7)
        gen = float(row.get("timing_s/gen", 0.0))
        if 0 < gen < step_s:
            ax.axvline(gen, color="black", linewidth=0.8, linestyle="--")
        ax.set_yticks(range(len(lanes)), [_lane_label(row, name) for name in lanes], fontsize=7)
        ax.set_xlim(0, step_s)
        overlap = float(row.get("timing_s/overlap", 0.0))
        ax.set_title(f"step {row['step']}: alive (light), busy (dark), cold start (hatched); "
                     f"learner busy while actors ran {overlap:.2f} s; dashed: last actor done",
                     fontsize=8)
    axes[-1, 0].set_xlabel("seconds since step start")
    return _save(fig, path)


def write_plots(rows: list[dict], run_dir: Path) -> list[Path]:
    if not rows:
        return []
    run_dir = Path(run_dir)
    return [
        plot_reward(rows, run_dir / "reward.png"),
        plot_gpu_seconds(rows, run_dir / "gpu_seconds.png"),
        plot_timeline(rows, run_dir / "timeline.png"),
    ]
