"""Response-length prediction: per-prompt EWMA across epochs, a quantile for unseen prompts.

A prompt's response length changes little from one epoch to the next, so the prediction for
a prompt seen before is an exponentially weighted moving average of its observed lengths:

    first observation:  pred = x
    later:              pred = alpha * x + (1 - alpha) * pred

``alpha`` is the weight of the newest epoch (1 = last value only). What "length" means is
the caller's choice; the driver feeds the mean response length of the prompt's GRPO group.
Several observations of one id in a single `update` call count as one epoch (their mean).

Unseen prompts get ``default_quantile`` of the most recent ``window`` observed lengths across
the dataset (a running quantile, so it follows the policy as responses grow or shrink), or
``prior`` before anything was observed.

Ids are stored as ``str(id)``, so ``state_dict()`` is JSON-serialisable and ids 7 and "7"
are the same prompt. `prediction_error` scores predictions (MAE, Spearman rank correlation).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np


class LengthPredictor:
    def __init__(self, alpha: float = 0.5, default_quantile: float = 0.5, window: int = 4096,
                 prior: float = 256.0):
        self._configure(alpha, default_quantile, window, prior)

    def _configure(self, alpha: float, default_quantile: float, window: int,
                   prior: float) -> None:
        """Validate hyper-parameters and start from an empty history."""
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        if not 0 <= default_quantile <= 1:
            raise ValueError("default_quantile must be in [0, 1]")
        if window < 1:
            raise ValueError("window must be >= 1")
        if prior < 0:
            raise ValueError("prior must be >= 0")
        self.alpha = float(alpha)
        self.default_quantile = float(default_quantile)
        self.window = int(window)
        self.prior = float(prior)
        self._ewma: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self._recent: deque[float] = deque(maxlen=self.window)

    def __len__(self) -> int:
        return len(self._ewma)

    def __contains__(self, prompt_id: Hashable) -> bool:
        return str(prompt_id) in self._ewma

    def default(self) -> float:
        """Prediction for a prompt never observed."""
        if not self._recent:
            return self.prior
        return float(np.quantile(np.fromiter(self._recent, float), self.default_quantile))

    def predict(self, ids: Sequence[Hashable]) -> np.ndarray:
        fallback = None
        out = np.empty(len(ids), dtype=float)
        for i, prompt_id in enumerate(ids):
            value = self._ewma.get(str(prompt_id))
            if value is None:
                if fallback is None:
                    fallback = self.default()
                value = fallback
            out[i] = value
        return out

    def known(self, ids: Sequence[Hashable]) -> np.ndarray:
        return np.array([str(i) in self._ewma for i in ids], dtype=bool)

    def observations(self, prompt_id: Hashable) -> int:
        return self._count.get(str(prompt_id), 0)

    def update(self, ids: Sequence[Hashable], lengths: Sequence[float] | np.ndarray) -> None:
        """One epoch's observed lengths (aligned with ids)."""
        values = np.asarray(lengths, dtype=float).reshape(-1)
        if len(values) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(values)} lengths")
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError("lengths must be finite and >= 0")
        per_id: dict[str, list[float]] = {}
        for prompt_id, x in zip(ids, values.tolist(), strict=True):
            per_id.setdefault(str(prompt_id), []).append(x)
        for key, xs in per_id.items():
            x = sum(xs) / len(xs)
            old = self._ewma.get(key)
            self._ewma[key] = x if old is None else self.alpha * x + (1 - self.alpha) * old
            self._count[key] = self._count.get(key, 0) + 1
            self._recent.append(x)

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "default_quantile": self.default_quantile,
            "window": self.window,
            "prior": self.prior,
            "ewma": dict(self._ewma),
            "count": dict(self._count),
            "recent": list(self._recent),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._configure(float(state["alpha"]), float(state["default_quantile"]),
                        int(state["window"]), float(state["prior"]))
        self._ewma = {str(k): float(v) for k, v in state["ewma"].items()}
        self._count = {str(k): int(v) for k, v in state["count"].items()}
        self._recent.extend(float(x) for x in state["recent"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> LengthPredictor:
        predictor = cls()
        predictor.load_state_dict(state)
        return predictor


def rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.concatenate(([True], xs[1:] != xs[:-1])))
    ends = np.concatenate((starts[1:], [n]))
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(n, dtype=float)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson on tie-averaged ranks); nan if either is constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("spearman needs two 1-D arrays of the same length")
    if len(a) < 2:
        return float("nan")
    ra, rb = rank_average(a), rank_average(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = float(np.sqrt((ra @ ra) * (rb @ rb)))
    return float((ra @ rb) / denom) if denom > 0 else float("nan")


def prediction_error(pred: Sequence[float] | np.ndarray,
                     actual: Sequence[float] | np.ndarray) -> dict[str, float]:
    """{"mae": mean |pred - actual|, "spearman": rank correlation (nan if undefined)}."""
    p, a = np.asarray(pred, dtype=float), np.asarray(actual, dtype=float)
    if p.shape != a.shape:
        raise ValueError(f"shape mismatch: {p.shape} vs {a.shape}")
    if len(p) == 0:
        return {"mae": float("nan"), "spearman": float("nan")}
    return {"mae": float(np.abs(p - a).mean()), "spearman": spearman(p, a)}
