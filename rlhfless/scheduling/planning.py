"""What the planner feeds the policies: group lengths, the work units, the prewarm margin.

The driver's `Planner` and the simulator build their inputs here, so both decide the same way:

* `GroupLengthPredictor` — three EWMAs per prompt: the mean response length of its GRPO
  group (``tokens`` of the time model), the group's longest sample (``lmax``: the decode
  iterations the group holds its actor for) and the mean *square* of its lengths (its KV
  reads). A group's longest sample is typically 1.5–3× its mean in long-tailed reasoning RL;
  planning with the mean as the longest under-predicts the bins that decide the makespan.
  ``state_dict`` is JSON-serialisable; states saved before the mean square existed, and by a
  plain `LengthPredictor` (mean only), load too.
* `planning_workload(pred_mean, pred_max, group_size, prompt_tokens, mean_square=...)` — the
  units the policies split (`Workload.groups` with ``lmax`` from the max EWMA and, by
  default, the groups' KV reads in ``ctx``, priced by ``Profile.tpot_per_ctx_s``; with that
  coefficient at 0 the context term changes nothing). The reads grow with a length's
  square, so G samples of the mean length would under-count a group with long samples: they
  are G·(prompt·mean + mean square / 2) from the mean-square EWMA, or, for a prompt without
  one, summed over the group's samples spread between the mean and the longest
  (`spread_context`), which under-counts groups whose samples split into run-aways at the
  limit and short answers by ~20–30%.
* `prewarm_margin(cold_starts)` — the safety margin of every prewarm plan: half the longest
  cold start. Phases vary from step to step; starting a stage too late puts the rest of its
  cold start on the critical path, too early only bills idle seconds.
* `ewma(old, new, alpha)` and `RatioTracker` — recent measurements (phase times, the ratio of
  actual to planned rollout time) weigh more than old ones.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from rlhfless.scheduling.predictor import LengthPredictor
from rlhfless.scheduling.workmodel import Workload, spread_context

PREWARM_MARGIN_FRACTION = 0.5  # of the longest cold start
PHASE_ALPHA = 0.5  # weight of the newest measurement in phase-time EWMAs


class GroupLengthPredictor:
    """EWMA of each prompt's group-mean length and of its group's longest sample."""

    def __init__(self, alpha: float = 0.5, prior: float = 256.0, default_quantile: float = 0.5,
                 window: int = 4096):
        self.mean = LengthPredictor(alpha, default_quantile, window, prior)
        self.max = LengthPredictor(alpha, default_quantile, window, prior)
        self.square = LengthPredictor(alpha, default_quantile, window, prior * prior)

    def __len__(self) -> int:
        return len(self.mean)

    def predict(self, ids: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
        """(mean, longest) per prompt; the longest is never below the mean."""
        mean = self.mean.predict(ids)
        return mean, np.maximum(self.max.predict(ids), mean)

    def predict_square(self, ids: Sequence[Hashable]) -> np.ndarray | None:
        """Mean square length per prompt, within [mean², longest²]; NaN where the mean is
        known but the square is not (a state saved before it existed); None before any
        square was observed."""
        if len(self.square) == 0:
            return None
        mean, top = self.predict(ids)
        square = np.clip(self.square.predict(ids), mean * mean, top * top)
        stale = self.mean.known(ids) & ~self.square.known(ids)
        return np.where(stale, np.nan, square)

    def update(self, ids: Sequence[Hashable], means: Sequence[float] | np.ndarray,
               maxes: Sequence[float] | np.ndarray,
               squares: Sequence[float] | np.ndarray | None = None) -> None:
        """One epoch's group means, group maxima and (optional) mean squares, aligned with
        ids."""
        self.mean.update(ids, means)
        self.max.update(ids, maxes)
        if squares is not None:
            self.square.update(ids, squares)

    def observe(self, ids: Sequence[Hashable],
                lengths: Sequence[Sequence[float]] | np.ndarray) -> None:
        """One epoch's response lengths, one sequence of G lengths per prompt (ragged ok)."""
        if len(lengths) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(lengths)} groups of lengths")
        groups = [np.asarray(g, dtype=float).reshape(-1) for g in lengths]
        if any(len(g) == 0 for g in groups):
            raise ValueError("every group needs at least one response length")
        self.update(ids, [float(g.mean()) for g in groups], [float(g.max()) for g in groups],
                    [float((g * g).mean()) for g in groups])

    def default(self) -> float:
        return self.mean.default()

    def known_fraction(self, ids: Sequence[Hashable]) -> float:
        """Share of `ids` observed before (0 with none): how much a plan rests on data."""
        return float(self.mean.known(ids).mean()) if len(ids) else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.state_dict(), "max": self.max.state_dict(),
                "square": self.square.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "ewma" in state:  # a plain LengthPredictor's state: the group means only
            self.mean.load_state_dict(state)
            self.max.load_state_dict(state)
            return
        self.mean.load_state_dict(state["mean"])
        self.max.load_state_dict(state["max"])
        if "square" in state:
            self.square.load_state_dict(state["square"])


def planning_workload(pred_mean: Sequence[float] | np.ndarray,
                      pred_max: Sequence[float] | np.ndarray | None, group_size: int,
                      prompt_tokens: Sequence[float] | np.ndarray | None = None, *,
                      context: bool = True,
                      mean_square: Sequence[float] | np.ndarray | None = None) -> Workload:
    """The GRPO groups as units of the time model (see the module docstring).

    ``pred_max`` None plans every sample as long as the group mean (the inputs before the
    max predictor existed); ``context=False`` leaves the KV reads out. ``mean_square``
    (per group; NaN where unknown) gives the KV reads directly.
    """
    work = Workload.groups(pred_mean, group_size, prompt_tokens, lmax=pred_max)
    if not context:
        return work
    ctx = spread_context(work.lmax, work.tokens, work.seqs, work.prefill)
    if mean_square is not None:
        square = np.asarray(mean_square, dtype=float).reshape(-1)
        mean = work.tokens / np.maximum(work.seqs, 1.0)
        direct = work.seqs * (work.prefill * mean + 0.5 * square)
        ctx = np.where(np.isfinite(square), direct, ctx)
    return Workload(work.lmax, work.tokens, work.seqs, work.prefill, ctx)


def prewarm_margin(cold_starts: Mapping[str, float]) -> float:
    """Seconds a prewarmed stage should be ready before it is needed."""
    return PREWARM_MARGIN_FRACTION * max(cold_starts.values(), default=0.0)


def ewma(old: float | None, new: float, alpha: float = PHASE_ALPHA) -> float:
    """Exponentially weighted mean; the first value is taken as is."""
    if not 0 < alpha <= 1:
        raise ValueError("alpha must be in (0, 1]")
    return float(new) if old is None else alpha * float(new) + (1 - alpha) * old


class RatioTracker:
    """EWMA of actual / planned (e.g. rollout seconds), to correct the next plan's timing.

    Each observation is clipped to [1/limit, limit]: one step planned without length
    predictions (the first) must not drag the next plans off by an order of magnitude.
    Callers should only observe steps planned from real predictions.
    """

    def __init__(self, alpha: float = PHASE_ALPHA, limit: float = 2.0):
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.alpha = alpha
        self.limit = limit
        self.ratio: float | None = None

    def observe(self, planned: float, actual: float) -> None:
        if planned > 0 and actual > 0 and np.isfinite(planned) and np.isfinite(actual):
            r = min(max(actual / planned, 1.0 / self.limit), self.limit)
            self.ratio = ewma(self.ratio, r, self.alpha)

    def correct(self, planned: float) -> float:
        return planned * (self.ratio if self.ratio is not None else 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "limit": self.limit, "ratio": self.ratio}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.alpha = float(state["alpha"])
        self.limit = float(state.get("limit", 2.0))
        self.ratio = None if state.get("ratio") is None else float(state["ratio"])
