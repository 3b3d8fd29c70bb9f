"""The streaming learner: how many GPUs it gets and when it starts.

In a streaming step every GRPO group goes to one fused learner function (reference log-probs,
critic values, forward/backward; gradients accumulate) as soon as its samples are done and
scored, and ONE optimizer step follows the last group. The learner is one instance of
``gpus`` data-parallel ranks; it cold-starts once per step (process, CUDA/NCCL init, then its
state — policy, optimizer, reference, critic — loaded in parallel by every rank).

Time model (seconds from the rollout's start). Groups arrive at ``a_1 ≤ … ≤ a_m`` with work
``w_j`` GPU-seconds each (tokens × ``gpu_s_per_token``); the learner, ready at ``r``,
processes them first come first served at L GPUs, so a group takes ``w_j / L``:

    end(r) = max(r + W/L, E),   E = max_k (a_k + Σ_{j≥k} w_j / L)

(E is the end with a learner ready from the start; W = Σ w). Any ready time up to
``r* = E − W/L`` gives the same end, so the cheapest start that costs no time is just in time:
ready at ``r* − margin``. The step's learner part ends at ``end + finish_s`` (gradient
reduction, the optimizer step, the weights publish).

`plan_learner` evaluates every size L in ``profile.candidates()`` (memory bound below, the
GPU budget above) and picks the best ``λ·T/T_ref + (1−λ)·C/C_ref`` like the actor count
(`rlhfless.scheduling.scaling`; ``time_slack`` drops sizes more than that fraction slower
than the fastest), with T = end + finish and C = L × (T − start) GPU-seconds.
Under a quota (``free_gpus``: GPUs the actors leave free over time) a size starts no earlier
than its GPUs are free.

The start is planned relative to the end: ``lead_s = end_s − start_s`` before the step's
predicted end. The rollout's end (its longest group) is predicted far better than the
arrival of the groups before it (a max predictor regresses to similar values inside a
length-aware bin), so a driver starts the learner at ``t0 + corrected end − lead_s``, the
end corrected by the recent ratio of actual to planned rollout times
(`rlhfless.scheduling.planning.RatioTracker`) — or earlier, as soon as the work already
arrived would keep the learner busy until that end (`learner_start`, checked at every group
arrival): a learner started then neither idles before the end nor falls behind work that is
already in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.scaling import best_index, scores
from rlhfless.scheduling.workmodel import Workload, unit_finish_times

Interval = tuple[float, float]


@dataclass(frozen=True)
class LearnerProfile:
    """Performance and size limits of the fused learner function."""

    gpu_s_per_token: float  # GPU-seconds per token (prompt once + responses), all passes
    init_s: float = 10.0  # process, CUDA context, NCCL, before any state is loaded
    load_gpu_s: float = 0.0  # state bytes / per-GPU load bandwidth (each rank loads 1/L)
    finish_s: float = 0.0  # after the last group: gradient reduction + optimizer step + publish
    min_gpus: int = 1  # fewest GPUs the sharded state (+ activations) fits on
    max_gpus: int = 1
    gpu_step: int = 1  # sizes are multiples of this (e.g. GPUs per node)

    def __post_init__(self) -> None:
        if self.gpu_s_per_token < 0 or self.init_s < 0 or self.load_gpu_s < 0:
            raise ValueError("learner times must be >= 0")
        if self.finish_s < 0:
            raise ValueError("finish_s must be >= 0")
        if self.gpu_step < 1 or self.min_gpus < 1 or self.max_gpus < self.min_gpus:
            raise ValueError("need gpu_step >= 1 and 1 <= min_gpus <= max_gpus")

    def cold_start_s(self, gpus: int) -> float:
        return self.init_s + self.load_gpu_s / gpus

    def candidates(self) -> list[int]:
        first = math.ceil(self.min_gpus / self.gpu_step) * self.gpu_step
        sizes = list(range(first, self.max_gpus + 1, self.gpu_step))
        return sizes or [self.max_gpus]


class LearnerRow(NamedTuple):
    gpus: int
    start_s: float
    end_s: float
    gpu_seconds: float
    score: float


@dataclass(frozen=True)
class LearnerPlan:
    gpus: int
    start_s: float  # start (cold start begins), seconds after the rollout starts
    ready_s: float
    end_s: float  # predicted: last group done + finish_s
    gpu_seconds: float
    table: list[LearnerRow]
    gpu_s_per_token: float = 0.0
    cold_start_s: float = 0.0
    finish_s: float = 0.0

    @property
    def lead_s(self) -> float:
        """How long before the step's end the learner starts."""
        return self.end_s - self.start_s

    def start_at(self, corrected_end_s: float) -> float:
        """Start time (seconds after the rollout starts) for a corrected predicted end."""
        return max(0.0, corrected_end_s - self.lead_s)


def learner_queue(arrivals: Sequence[float] | np.ndarray, work_gpu_s: Sequence[float] | np.ndarray,
                  gpus: int, ready_s: float) -> tuple[float, list[Interval]]:
    """FIFO processing of groups by a learner of `gpus` GPUs ready at `ready_s`.

    Returns when the last group is done (``ready_s`` with no groups) and the busy intervals
    (merged).
    """
    if gpus < 1:
        raise ValueError("gpus must be >= 1")
    a = np.asarray(arrivals, dtype=float).reshape(-1)
    w = np.asarray(work_gpu_s, dtype=float).reshape(-1)
    if a.shape != w.shape:
        raise ValueError("arrivals and work must align")
    t, busy = float(ready_s), []
    for k in np.argsort(a, kind="stable"):
        begin = max(t, float(a[k]))
        t = begin + float(w[k]) / gpus
        if busy and begin <= busy[-1][1]:
            busy[-1] = (busy[-1][0], t)
        else:
            busy.append((begin, t))
    return t, busy


def _earliest_end(a_sorted: np.ndarray, w_sorted: np.ndarray, gpus: int) -> float:
    """E = max_k (a_k + Σ_{j≥k} w_j / L): the end with a learner ready from the start."""
    tail = np.cumsum(w_sorted[::-1])[::-1] / gpus
    return float((a_sorted + tail).max())


def earliest_free(free_gpus: Sequence[tuple[float, int]] | None, gpus: int) -> float:
    """First time from which at least `gpus` GPUs stay free; inf if never.

    ``free_gpus``: (time, free GPUs from then on) change points, sorted by time. None means
    an unlimited pool (time 0).
    """
    if free_gpus is None:
        return 0.0
    start = math.inf
    for t, free in reversed(list(free_gpus)):
        if free < gpus:
            break
        start = t
    return start


def plan_learner(arrivals: Sequence[float] | np.ndarray, tokens: Sequence[float] | np.ndarray,
                 profile: LearnerProfile, *, lam: float = 0.5, margin_s: float = 0.0,
                 free_gpus: Sequence[tuple[float, int]] | None = None,
                 time_slack: float | None = None) -> LearnerPlan:
    """Size and start of the learner for one step (see the module docstring)."""
    a = np.asarray(arrivals, dtype=float).reshape(-1)
    w = np.asarray(tokens, dtype=float).reshape(-1) * profile.gpu_s_per_token
    if a.shape != w.shape:
        raise ValueError("arrivals and tokens must align")
    if len(a) == 0:
        raise ValueError("no groups to learn from")
    if margin_s < 0:
        raise ValueError("margin_s must be >= 0")
    order = np.argsort(a, kind="stable")
    a_s, w_s = a[order], w[order]
    total = float(w.sum())
    rows: list[tuple[int, float, float, float, float]] = []  # gpus, start, ready, end, gpu_s
    for gpus in profile.candidates():
        first = earliest_free(free_gpus, gpus)
        if not math.isfinite(first):
            continue
        cold = profile.cold_start_s(gpus)
        just_in_time = _earliest_end(a_s, w_s, gpus) - total / gpus - margin_s
        ready = max(first + cold, just_in_time, cold)
        end = max(ready + total / gpus, _earliest_end(a_s, w_s, gpus)) + profile.finish_s
        start = ready - cold
        rows.append((gpus, start, ready, end, gpus * (end - start)))
    if not rows:
        raise ValueError("no learner size fits the free GPUs")
    times = np.array([r[3] for r in rows])
    costs = np.array([r[4] for r in rows])
    score, _, _ = scores(times, costs, lam, time_slack)
    best = best_index(score)
    gpus, start, ready, end, gpu_s = rows[best]
    table = [LearnerRow(r[0], r[1], r[3], r[4], float(s)) for r, s in zip(rows, score,
                                                                           strict=True)]
    return LearnerPlan(gpus=gpus, start_s=start, ready_s=ready, end_s=end, gpu_seconds=gpu_s,
                       table=table, gpu_s_per_token=profile.gpu_s_per_token,
                       cold_start_s=profile.cold_start_s(gpus), finish_s=profile.finish_s)


def learner_start(plan: LearnerPlan, corrected_end_s: float,
                  arrivals: Sequence[float] | np.ndarray = (),
                  tokens: Sequence[float] | np.ndarray = ()) -> float:
    """When to start the planned learner (seconds after the rollout starts).

    The planned time (`LearnerPlan.start_at` of the corrected end), or the first group
    arrival before it at which the work in so far (``tokens`` of the groups arrived) would
    keep ``plan.gpus`` busy from the end of the cold start until the corrected end less the
    finish. Only arrivals up to a moment are used to decide at that moment, so a driver can
    evaluate it as groups come in.
    """
    planned = plan.start_at(corrected_end_s)
    a = np.asarray(arrivals, dtype=float).reshape(-1)
    w = np.asarray(tokens, dtype=float).reshape(-1)
    if a.shape != w.shape:
        raise ValueError("arrivals and tokens must align")
    order = np.argsort(a, kind="stable")
    busy = np.cumsum(w[order]) * plan.gpu_s_per_token / plan.gpus
    for t, work_s in zip(a[order], busy, strict=True):
        if t >= planned:
            break
        if work_s >= corrected_end_s - plan.finish_s - t - plan.cold_start_s:
            return float(t)
    return planned


def group_arrivals(work: Workload, bins: Sequence[Sequence[int]], profile: Profile,
                   bin_start_s: Sequence[float] | None = None) -> np.ndarray:
    """Predicted time each group is done (bin start + `unit_finish_times`)."""
    finish = unit_finish_times(work, bins, profile)
    if bin_start_s is not None:
        for b, start in zip(bins, bin_start_s, strict=True):
            finish[np.asarray(b, dtype=int)] += start
    return finish


def actor_releases(work: Workload, bins: Sequence[Sequence[int]], profile: Profile,
                   tau: float = 1.0,
                   bin_start_s: Sequence[float] | None = None) -> np.ndarray:
    """Predicted time each actor is released: when a fraction tau of its samples is done
    (it hands the rest off and scales down), or its bin's end with tau = 1."""
    if not 0 < tau <= 1:
        raise ValueError("tau must be in (0, 1]")
    finish = unit_finish_times(work, bins, profile)
    out = np.zeros(len(bins))
    for i, b in enumerate(bins):
        idx = np.asarray(b, dtype=int)
        if len(idx) == 0:
            continue
        order = idx[np.argsort(finish[idx], kind="stable")]
        done = np.cumsum(work.seqs[order])
        k = int(np.searchsorted(done, tau * done[-1] - 1e-9))
        out[i] = finish[order[min(k, len(order) - 1)]]
        if bin_start_s is not None:
            out[i] += bin_start_s[i]
    return out


def free_gpu_curve(releases: Sequence[float] | np.ndarray, gpus_per_actor: int,
                   quota: int) -> list[tuple[float, int]]:
    """(time, free GPUs) change points when actors holding `gpus_per_actor` each leave."""
    rel = np.sort(np.asarray(releases, dtype=float).reshape(-1))
    held = len(rel) * gpus_per_actor
    curve = [(0.0, quota - held)]
    for k, t in enumerate(rel, 1):
        curve.append((float(t), quota - held + k * gpus_per_actor))
    return curve


class ArrivalCurve:
    """The shape of the learner's work arrivals over a rollout, learned from recent steps.

    Per step: the share of the step's tokens that had arrived by each fraction of the rollout
    time (`points` + 1 knots, 0 … 1), an EWMA over steps. Predicted per-group arrivals
    inside a length-aware bin regress to similar values (they are EWMAs), so they compress
    the curve toward the end; the measured shape does not. `expected` turns it into
    ``points`` chunks of work for `plan_learner`.
    """

    def __init__(self, points: int = 40, alpha: float = 0.5):
        if points < 2:
            raise ValueError("points must be >= 2")
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.points = points
        self.alpha = alpha
        self.shape: np.ndarray | None = None  # cumulative share at knots 0 .. points

    @property
    def known(self) -> bool:
        return self.shape is not None

    def observe(self, arrivals_s: Sequence[float] | np.ndarray,
                tokens: Sequence[float] | np.ndarray, rollout_s: float) -> None:
        a = np.asarray(arrivals_s, dtype=float).reshape(-1)
        w = np.asarray(tokens, dtype=float).reshape(-1)
        if a.shape != w.shape or len(a) == 0 or rollout_s <= 0 or w.sum() <= 0:
            return
        knots = np.linspace(0.0, 1.0, self.points + 1) * rollout_s
        order = np.argsort(a, kind="stable")
        cum = np.concatenate(([0.0], np.cumsum(w[order]))) / w.sum()
        share = cum[np.searchsorted(a[order], knots, "right")]
        share[-1] = 1.0
        self.shape = share if self.shape is None else (
            self.alpha * share + (1 - self.alpha) * self.shape)

    def expected(self, total_tokens: float, rollout_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(arrival seconds, tokens) of `points` chunks: each knot interval's share arriving
        at its end."""
        if self.shape is None:
            raise ValueError("no arrivals observed yet")
        knots = np.linspace(0.0, 1.0, self.points + 1) * rollout_s
        chunk = np.diff(self.shape) * total_tokens
        return knots[1:], np.maximum(chunk, 0.0)

    def state_dict(self) -> dict[str, object]:
        return {"points": self.points, "alpha": self.alpha,
                "shape": None if self.shape is None else self.shape.tolist()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.points = int(state["points"])  # type: ignore[arg-type]
        self.alpha = float(state["alpha"])  # type: ignore[arg-type]
        shape = state.get("shape")
        self.shape = None if shape is None else np.asarray(shape, dtype=float)
