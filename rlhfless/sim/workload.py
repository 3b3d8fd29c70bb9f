"""Response-length workloads: who generates how many tokens, per prompt, per epoch.

A workload is a table lengths[epoch, prompt, sample] plus each prompt's length in tokens.
Synthetic families draw a latent typical length per prompt (its difficulty) that persists
across epochs with a small random drift — the property length prediction relies on — and
then the G samples of a GRPO group scatter around it.  Lengths are truncated at the
generation limit, so heavy tails pile up at max_len exactly as real RL rollouts do.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_len: np.ndarray  # [n_prompts] tokens
    lengths: np.ndarray  # [epochs, n_prompts, group_size] response tokens, 1..max_len
    max_len: int
    prompt_ids: tuple[str, ...] = ()

    @property
    def epochs(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def n_prompts(self) -> int:
        return int(self.lengths.shape[1])

    @property
    def group_size(self) -> int:
        return int(self.lengths.shape[2])

    def steps(self, prompts_per_step: int, seed: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(epoch, prompt indices) per RL step; the dataset is reshuffled every epoch."""
        rng = np.random.default_rng(seed)
        for e in range(self.epochs):
            order = rng.permutation(self.n_prompts)
            for s in range(0, self.n_prompts - prompts_per_step + 1, prompts_per_step):
                yield e, order[s : s + prompts_per_step]

    def persistence(self) -> float:
        """Fraction of prompts whose group-mean length moves < 50 tokens between epochs."""
        if self.epochs < 2:
            return float("nan")
        means = self.lengths.mean(axis=2)
        return float((np.abs(np.diff(means, axis=0)) < 50).mean())

    def tail_ratio(self) -> float:
        """p99 / median of all response lengths: how long the tail is."""
        flat = self.lengths.ravel()
        return float(np.percentile(flat, 99) / max(np.median(flat), 1.0))


@dataclass(frozen=True)
class Family:
    """Parameters of a synthetic length family (see `FAMILIES`)."""

    kind: str  # "lognormal" | "bimodal" | "pareto"
    median: float  # typical prompt-level length (lognormal; easy mode for bimodal)
    sigma: float  # spread of prompt-level lengths (log space) — the tail knob
    within: float  # spread of samples around their prompt's length (log space)
    max_len: int
    prompt_median: float
    drift: float = 15.0  # sd of a prompt's latent length change per epoch (tokens)
    hard_frac: float = 0.3  # bimodal: share of hard prompts
    hard_median: float = 4000.0  # bimodal: hard prompts' typical length
    alpha: float = 1.5  # pareto tail index (smaller = heavier)
    runaway: float = 0.0  # mean chance a sample loops until the limit (truncated at max_len)
    # How that chance spreads over prompts: each prompt draws its own propensity from
    # Beta(runaway·conc, (1−runaway)·conc) once, for all epochs.  Small conc: a few hard
    # prompts loop often (predictable); conc=inf: every sample has the same chance (not).
    runaway_conc: float = float("inf")


# Sources and calibration of each family: benchmarks/results/README.md ("Workloads").
FAMILIES: dict[str, Family] = {
    # GSM8K-like: short answers, mild spread.
    "gsm8k": Family("lognormal", 220, 0.45, 0.12, 1024, 110, drift=10.0),
    # DAPO-like long reasoning RL (512 prompts × 16, responses up to 20k tokens, mean ~5.6k):
    # calibrated so the verl-like step spends ~80% (7B) / ~66% (32B) of its time generating
    # and the last 10% of requests take ~50–60% of the rollout.
    "dapo": Family("lognormal", 4500, 0.5, 0.35, 20480, 180, drift=80.0, runaway=0.01,
                   runaway_conc=0.5),
    # GPQA-like: science multiple choice with reasoning, mid-length answers.
    "gpqa": Family("lognormal", 900, 0.55, 0.3, 4096, 260, drift=30.0, runaway=0.01,
                   runaway_conc=0.5),
    # LiveCodeBench-like: code generation, long and heavy-tailed.
    "lcb": Family("lognormal", 1400, 0.7, 0.35, 8192, 420, drift=40.0, runaway=0.02,
                  runaway_conc=0.5),
    # Long reasoning (LiveCodeBench-/GPQA-like): wide spread, samples hitting the limit.
    "longtail": Family("lognormal", 1200, 0.8, 0.25, 8192, 400, runaway=0.01,
                       runaway_conc=0.5),
    # The same lengths with every sample equally likely to run away: tails nobody can predict.
    "longtail-random": Family("lognormal", 1200, 0.8, 0.25, 8192, 400, runaway=0.01),
    "bimodal": Family("bimodal", 600, 0.35, 0.25, 8192, 300, hard_median=4000),
    "pareto": Family("pareto", 500, 0.0, 0.3, 8192, 300, alpha=1.3),
}


def _prompt_levels(f: Family, n: int, rng: np.random.Generator) -> np.ndarray:
    if f.kind == "lognormal":
        return f.median * rng.lognormal(0.0, f.sigma, n)
    if f.kind == "bimodal":
        hard = rng.random(n) < f.hard_frac
        med = np.where(hard, f.hard_median, f.median)
        return med * rng.lognormal(0.0, f.sigma, n)
    if f.kind == "pareto":
        return f.median * (1.0 + rng.pareto(f.alpha, n))
    raise ValueError(f"unknown family kind {f.kind!r}")


def synthetic(
    family: str | Family,
    n_prompts: int,
    group_size: int,
    epochs: int,
    seed: int = 0,
    **overrides: float,
) -> Workload:
    """Draw a workload from a named family (or a Family), overriding any of its fields."""
    f = FAMILIES[family] if isinstance(family, str) else family
    if overrides:
        f = Family(**{**f.__dict__, **overrides})
    rng = np.random.default_rng(seed)
    level = np.clip(_prompt_levels(f, n_prompts, rng), 8, f.max_len)
    prompt_len = np.maximum(8, f.prompt_median * rng.lognormal(0, 0.35, n_prompts)).astype(int)
    if f.runaway and np.isfinite(f.runaway_conc):
        loop_p = rng.beta(f.runaway * f.runaway_conc, (1 - f.runaway) * f.runaway_conc, n_prompts)
    else:
        loop_p = np.full(n_prompts, f.runaway)
    out = np.empty((epochs, n_prompts, group_size), dtype=np.int64)
    for e in range(epochs):
        if e:
            level = np.clip(level + rng.normal(0.0, f.drift, n_prompts), 8, f.max_len)
        samples = level[:, None] * rng.lognormal(0.0, f.within, (n_prompts, group_size))
        if f.runaway:
            samples[rng.random(samples.shape) < loop_p[:, None]] = f.max_len
        out[e] = np.clip(np.rint(samples), 1, f.max_len)
    name = family if isinstance(family, str) else f.kind
    return Workload(name, prompt_len, out, f.max_len, tuple(str(i) for i in range(n_prompts)))


def load_trace(path: str | Path, default_prompt_len: int = 256) -> Workload:
    """Read a jsonl trace: one line per sample {"prompt_id", "epoch", "length"[, "prompt_len"]}.

    Every (prompt, epoch) must have the same number of lines (the group size), and every
    prompt must appear in every epoch.
    """
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    plen: dict[str, int] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            pid, ep, ln = str(rec["prompt_id"]), int(rec["epoch"]), int(rec["length"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: need prompt_id, epoch, length ({exc})") from exc
        if ln < 1:
            raise ValueError(f"{path}:{n}: length must be ≥ 1")
        groups[(pid, ep)].append(ln)
        plen.setdefault(pid, int(rec.get("prompt_len", default_prompt_len)))
    if not groups:
        raise ValueError(f"{path}: empty trace")
    pids = sorted(plen)
    epochs = sorted({e for _, e in groups})
    sizes = {len(v) for v in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"{path}: groups have different sizes {sorted(sizes)}")
    g = sizes.pop()
    lengths = np.empty((len(epochs), len(pids), g), dtype=np.int64)
    for ei, e in enumerate(epochs):
        for pi, pid in enumerate(pids):
            if (pid, e) not in groups:
                raise ValueError(f"{path}: prompt {pid} missing in epoch {e}")
            lengths[ei, pi] = groups[(pid, e)]
    prompt_len = np.array([plen[p] for p in pids], dtype=np.int64)
    return Workload(Path(path).stem, prompt_len, lengths, int(lengths.max()), tuple(pids))


def save_trace(w: Workload, path: str | Path) -> None:
    ids = w.prompt_ids or tuple(str(i) for i in range(w.n_prompts))
    with Path(path).open("w") as fh:
        for e in range(w.epochs):
            for p in range(w.n_prompts):
                for ln in w.lengths[e, p]:
                    rec = {"prompt_id": ids[p], "epoch": e, "length": int(ln)}
                    rec["prompt_len"] = int(w.prompt_len[p])
                    fh.write(json.dumps(rec) + "\n")
