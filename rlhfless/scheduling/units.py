"""Sample-level units: a GRPO group whose samples are too long for one actor is split.

A group's G samples normally stay together on one actor: the prompt is prefilled once and
the group is reported whole. But a group whose samples all run long (a prompt that runs
away to the length limit again and again) holds its actor for the longest sample's
iterations *and* makes every iteration read G long KV caches: alone on an actor it can take
far longer than its longest sample alone, so it decides the rollout however many actors
run. Splitting its samples over k parts (each part prefills the prompt once; the learner
gets the group when all its samples are in) brings each part near the longest sample's own
time, the step's irreducible critical path.

Which samples of a group will be long is unknown (the predictor knows the group's mean and
its longest sample, not which sample it is), so a part is planned pessimistically: its
longest sample is the group's longest, its tokens and KV reads its share of the group's.
Splitting therefore only pays for groups that are long throughout, and only those are split:

    t1   = max over groups of one sample of the group's longest length, alone on an actor
    a group whose time alone exceeds (1 + SPLIT_SLACK) · t1 is split into the fewest equal
    parts (sizes differ by at most one) whose largest part's time alone is within it.

Parts of one group have the same longest sample, so a length-aware split keeps them next to
each other and on one actor whenever that fits; splitting only adds freedom.

`SampleUnit` is what a plan hands out: a group index and the sample indices of that part
(the whole group is ``range(G)``). `bin_entries` turns a plan's bins into what the driver's
rollout takes: per actor, a group index where it runs the whole group, ``(index, sample
indices)`` where it runs a part (parts of one group on one actor merged). The driver builds
each actor's prompts from them (`RolloutPrompt.sample_indices`) and hands a group on when
all its samples are in, from however many actors; the sampler is counter-based per (prompt,
sample index), so where a sample runs does not change its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.workmodel import Workload, context_tokens, unit_times

# A split group's largest part may take this much longer alone than the batch's longest
# sample alone: 10% keeps parts few (each re-prefills the prompt) and the step near t1.
SPLIT_SLACK = 0.1


# One entry of an actor's bin: a whole group (its index) or a part (index, sample indices).
BinEntry = int | tuple[int, tuple[int, ...]]


class SampleUnit(NamedTuple):
    """Samples of one group that run together on one actor."""

    group: int
    samples: tuple[int, ...]


def whole_groups(work: Workload) -> list[SampleUnit]:
    """One unit per group, every sample of it (``seqs`` samples)."""
    return [SampleUnit(k, tuple(range(int(round(n))))) for k, n in enumerate(work.seqs)]


def single_sample_times(work: Workload, profile: Profile) -> np.ndarray:
    """Per group: its prompt's prefill plus its longest sample decoded alone."""
    lone = Workload(lmax=work.lmax, tokens=work.lmax, seqs=np.ones(len(work)),
                    prefill=work.prefill, ctx=context_tokens(work.prefill, work.lmax))
    return unit_times(lone, profile)


def part_sizes(group_size: int, parts: int) -> list[int]:
    """`parts` sizes summing to group_size, as equal as possible (largest first)."""
    base, extra = divmod(group_size, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def sample_units(work: Workload, profile: Profile,
                 slack: float | None = SPLIT_SLACK) -> tuple[Workload, list[SampleUnit]]:
    """The planning units: whole groups, and parts of the groups too long for one actor.

    ``work`` has one unit per group, ``seqs`` samples each (`Workload.groups`). Returns the
    units as a `Workload` and, aligned with it, which group and samples each one is.
    ``slack`` None keeps every group whole.
    """
    whole = whole_groups(work)
    if slack is None or len(work) == 0 or float(work.seqs.max()) < 2:
        return work, whole
    if slack < 0:
        raise ValueError("slack must be >= 0")
    assert work.ctx is not None
    limit = (1.0 + slack) * float(single_sample_times(work, profile).max())
    alone = unit_times(work, profile)
    cols: dict[str, list[float]] = {k: [] for k in ("lmax", "tokens", "seqs", "prefill", "ctx")}
    units: list[SampleUnit] = []
    for k in range(len(work)):
        group_size = len(whole[k].samples)
        sizes = [group_size]
        if alone[k] > limit and group_size > 1:
            sizes = _fewest_parts(work, k, profile, group_size, limit)
        first = 0
        for size in sizes:
            share = size / group_size
            cols["lmax"].append(float(work.lmax[k]))
            cols["tokens"].append(float(work.tokens[k]) * share)
            cols["seqs"].append(float(size))
            cols["prefill"].append(float(work.prefill[k]))
            cols["ctx"].append(float(work.ctx[k]) * share)
            units.append(SampleUnit(k, tuple(range(first, first + size))))
            first += size
    return Workload(**{k: np.array(v) for k, v in cols.items()}), units


def _fewest_parts(work: Workload, k: int, profile: Profile, group_size: int,
                  limit: float) -> list[int]:
    assert work.ctx is not None
    for parts in range(2, group_size + 1):
        sizes = part_sizes(group_size, parts)
        share = sizes[0] / group_size
        largest = Workload(lmax=work.lmax[k:k + 1], tokens=work.tokens[k:k + 1] * share,
                           seqs=[float(sizes[0])], prefill=work.prefill[k:k + 1],
                           ctx=work.ctx[k:k + 1] * share)
        if float(unit_times(largest, profile)[0]) <= limit:
            return sizes
    return [1] * group_size


def group_finish(units: Sequence[SampleUnit], unit_finish: np.ndarray,
                 n_groups: int) -> np.ndarray:
    """When each group is whole: the latest finish of its units."""
    out = np.zeros(n_groups)
    np.maximum.at(out, np.array([u.group for u in units], dtype=int),
                  np.asarray(unit_finish, dtype=float))
    return out


def bin_entries(units: Sequence[SampleUnit], bins: Sequence[Sequence[int]],
                group_size: int) -> list[list[BinEntry]]:
    """Per actor (in the plan's order), its groups as `BinEntry`: parts of one group that
    share an actor are merged, and a group whole on one actor is its plain index."""
    out: list[list[BinEntry]] = []
    for b in bins:
        held: dict[int, list[int]] = {}
        for k in b:
            held.setdefault(int(units[k].group), []).extend(int(i) for i in units[k].samples)
        out.append([g if sorted(s) == list(range(group_size)) else (g, tuple(sorted(s)))
                    for g, s in held.items()])
    return out
