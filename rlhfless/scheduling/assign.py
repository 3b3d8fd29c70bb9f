"""Prompt assignment: split GRPO groups (kept whole) into one bin per actor.

Public API (pure functions of numbers):

    assign(pred_lengths_per_group, n_bins, profile, group_size=1,
           policy="length-aware", seed=0, prompt_tokens=None) -> list[list[int]]

returns exactly ``n_bins`` lists of group indices; every group appears exactly once. Bins may
be empty only when there are fewer groups than bins. ``pred_lengths_per_group`` may also be a
ready `Workload` (then ``group_size``/``prompt_tokens`` are ignored). Bin time, makespan and
lower bounds are re-exported from `rlhfless.scheduling.workmodel`, which documents the time
model.

Policies:

* ``"length-aware"`` — sort groups by predicted length (longest first) and cut the sorted
  list into contiguous bins, so similar lengths share an actor: its sequences finish close
  together (no batch idles behind one straggler, and an actor of short groups is released as
  soon as it is done), and long groups share one long decode instead of each stretching a
  different actor. The cut points minimise the largest predicted bin time:
  bisection on the makespan C with a greedy feasibility check (fill each bin as far as its
  time stays ≤ C), which is exact for contiguous splits because a segment's time grows when
  it is extended on either side. Bins are numbered longest first; inside a bin groups are
  listed longest first, so an engine that admits requests in order starts the long ones first.
* ``"round-robin"`` — group i goes to bin i mod N (the order given; equal counts).
* ``"random"`` — a seeded shuffle dealt round-robin (equal counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.workmodel import (
    SortedRuns,
    Workload,
    as_workload,
    bin_time,
    bin_times,
    bound_parts,
    lower_bound,
    makespan,
    simple_lower_bound,
)

Policy = Literal["length-aware", "round-robin", "random"]
POLICIES: tuple[str, ...] = ("length-aware", "round-robin", "random")

__all__ = [
    "POLICIES",
    "LengthAware",
    "Policy",
    "Workload",
    "assign",
    "assign_workload",
    "bin_time",
    "bin_times",
    "length_aware",
    "lower_bound",
    "makespan",
    "simple_lower_bound",
]

# Bisection stops when the bracket on the makespan is this tight (relative).
_REL_TOL = 1e-4


def assign(pred_lengths_per_group: Workload | Sequence[float] | np.ndarray, n_bins: int,
           profile: Profile, group_size: int = 1, policy: Policy = "length-aware",
           seed: int = 0, prompt_tokens: Sequence[float] | np.ndarray | None = None,
           ) -> list[list[int]]:
    """Split groups into `n_bins` bins with `policy` (see module docstring)."""
    work = as_workload(pred_lengths_per_group, group_size, prompt_tokens)
    return assign_workload(work, n_bins, profile, policy, seed)


def assign_workload(work: Workload, n_bins: int, profile: Profile,
                    policy: Policy = "length-aware", seed: int = 0) -> list[list[int]]:
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    m = len(work)
    if policy == "round-robin":
        return [list(range(j, m, n_bins)) for j in range(n_bins)]
    if policy == "random":
        perm = np.random.default_rng(seed).permutation(m)
        return [perm[j::n_bins].tolist() for j in range(n_bins)]
    if policy == "length-aware":
        return length_aware(work, n_bins, profile)
    raise ValueError(f"unknown assignment policy {policy!r}; expected one of {POLICIES}")


class LengthAware:
    """Length-aware splits of one workload for any number of bins (the sort is shared).

    ``split(n)`` returns the cut points into ``runs.order`` and each run's predicted time;
    ``bins(n)`` the group indices per bin. `rlhfless.scheduling.scaling` sweeps N with it.
    """

    def __init__(self, work: Workload, profile: Profile):
        self.work = work
        self.runs = SortedRuns(work, profile)
        self._total, self._unit = bound_parts(work, profile) if len(work) else (0.0, 0.0)

    def split(self, n_bins: int) -> tuple[list[int], list[float]]:
        if n_bins < 1:
            raise ValueError("n_bins must be >= 1")
        if len(self.work) == 0:
            return [0], []
        lo = max(self._total / n_bins, self._unit)
        cuts, _ = self.runs.min_max_cuts(n_bins, lo, _REL_TOL)
        cuts = self._split_to_fill(cuts, n_bins)
        return cuts, [self.runs.time(cuts[b], cuts[b + 1]) for b in range(len(cuts) - 1)]

    def bins_from_cuts(self, cuts: list[int], n_bins: int) -> list[list[int]]:
        ordered = self.runs.order.tolist()
        bins = [ordered[cuts[b]:cuts[b + 1]] for b in range(len(cuts) - 1)]
        return bins + [[] for _ in range(n_bins - len(bins))]

    def bins(self, n_bins: int) -> list[list[int]]:
        return self.bins_from_cuts(self.split(n_bins)[0], n_bins)

    def _split_to_fill(self, cuts: list[int], n_bins: int) -> list[int]:
        """Use every actor: split the slowest multi-unit run while fewer than n_bins are used.

        A part of a contiguous run never takes longer than the run: the makespan cannot grow.
        """
        time = self.runs.time
        while len(cuts) - 1 < n_bins:
            spans = [(time(cuts[b], cuts[b + 1]), b) for b in range(len(cuts) - 1)
                     if cuts[b + 1] - cuts[b] > 1]
            if not spans:
                break
            _, b = max(spans)
            cuts.insert(b + 1, (cuts[b] + cuts[b + 1]) // 2)
        return cuts


def length_aware(work: Workload, n_bins: int, profile: Profile) -> list[list[int]]:
    """Contiguous split of the longest-first order minimising the predicted makespan."""
    return LengthAware(work, profile).bins(n_bins)
