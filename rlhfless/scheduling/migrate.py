"""Cut-and-migrate: when to cut an actor, and where its unfinished samples continue.

Cut rule: an actor holding ``total`` samples reports τ once
``cut_threshold(total, tau) = ceil(tau * total)`` of them are finished, unless all are.
``tau = 1`` never cuts. In the streaming step's hand-off cut the unfinished samples go
whole to the running actor with the fewest samples in flight; `plan_migration` below is for
cuts that re-plan the tail over several actors (one global cut, or a barrier).

Hand-off (the driver's streaming rollout): a cut actor's unfinished samples are merged into
the running actor with the fewest samples in flight (`handoff_target`), which continues them
in its running batch; the cut actor scales down at once.

Migration plan (the barrier-cut model the simulator still uses): the unfinished samples
come back with their partial
responses; each is continued (prompt + partial response re-prefilled, same weights version,
same random stream) on fewer actors than before, so the rest scale to zero. Every sample is
a unit of the time model (`rlhfless.scheduling.workmodel`): ``lmax = tokens`` = its predicted
remaining length, one sequence, ``prefill`` = its prompt + partial response tokens. With
``keys`` the samples of one prompt stay together (one unit: the engine can reuse the cached
prompt). With ``context=True`` each unit also carries the KV reads of its continuation
(``ctx`` = Σ context_tokens(prefix, remaining)), which the profile's ``tpot_per_ctx_s``
prices — long partial responses are slow to continue, not only slow to re-prefill. The
number of target actors is chosen like the rollout's actor count
(`rlhfless.scheduling.scaling`), among 1 .. n_from − 1, with the targets counted as warm
(they are the cut actors, kept instead of released), and the units are assigned
length-aware. Every item index appears in exactly one bin.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.scaling import ScalingRow, choose_from_candidates
from rlhfless.scheduling.workmodel import Workload, context_tokens


def cut_threshold(total: int, tau: float) -> int:
    """Finished samples after which an actor with `total` samples cuts (≥ 1)."""
    if not 0 < tau <= 1:
        raise ValueError("tau must be in (0, 1]")
    # The epsilon keeps e.g. 0.7 * 10 = 7.000000000000001 from becoming 8.
    return max(1, math.ceil(tau * total - 1e-9))


def handoff_target(in_flight: Mapping[str, int]) -> str | None:
    """The actor (by name) that takes a cut actor's samples: fewest samples in flight, ties
    by name (deterministic); None when no actor is running."""
    if not in_flight:
        return None
    return min(in_flight, key=lambda name: (in_flight[name], name))


def should_cut(done: int, total: int, tau: float) -> bool:
    """True once a fraction tau of the samples is finished and some are not."""
    return total > 0 and done < total and done >= cut_threshold(total, tau)


def remaining_estimate(predicted: Sequence[float] | np.ndarray,
                       generated: Sequence[float] | np.ndarray,
                       max_new_tokens: int, overrun_fraction: float = 0.25) -> np.ndarray:
    """Predicted decode tokens left for cut samples.

    ``predicted - generated`` while a sample is shorter than predicted. A sample already past
    its prediction is in the long tail, where the longer a response has run the longer it
    tends to keep running: assume ``overrun_fraction × generated`` more. Always within
    [1, max_new_tokens - generated].
    """
    pred = np.asarray(predicted, dtype=float)
    gen = np.asarray(generated, dtype=float)
    est = np.maximum(pred - gen, overrun_fraction * gen)
    budget = np.maximum(max_new_tokens - gen, 1.0)
    return np.clip(est, 1.0, budget)


@dataclass(frozen=True)
class MigrationPlan:
    n_targets: int
    bins: list[list[int]]  # indices into the unfinished items, one list per target actor
    table: list[ScalingRow]


def migration_units(remaining: Sequence[float] | np.ndarray,
                    prefill_tokens: Sequence[float] | np.ndarray | None = None,
                    keys: Sequence[Hashable] | None = None, context: bool = False,
                    ) -> tuple[Workload, list[list[int]]]:
    """Units of the time model for unfinished samples, and the item indices in each unit."""
    rem = np.asarray(remaining, dtype=float).reshape(-1)
    pre = (np.zeros_like(rem) if prefill_tokens is None
           else np.asarray(prefill_tokens, dtype=float).reshape(-1))
    if pre.shape != rem.shape:
        raise ValueError("prefill_tokens must align with remaining")
    if keys is None:
        members = [[i] for i in range(len(rem))]
    else:
        if len(keys) != len(rem):
            raise ValueError("keys must align with remaining")
        by_key: dict[Hashable, list[int]] = {}
        for i, key in enumerate(keys):
            by_key.setdefault(key, []).append(i)
        members = list(by_key.values())
    reads = context_tokens(pre, rem) if context else np.zeros_like(rem)
    work = Workload(
        lmax=np.array([rem[m].max() for m in members]) if members else np.zeros(0),
        tokens=np.array([rem[m].sum() for m in members]) if members else np.zeros(0),
        seqs=np.array([float(len(m)) for m in members]),
        prefill=np.array([pre[m].sum() for m in members]) if members else np.zeros(0),
        ctx=np.array([reads[m].sum() for m in members]) if members else np.zeros(0),
    )
    return work, members


def plan_migration(remaining: Sequence[float] | np.ndarray, n_from: int, profile: Profile, *,
                   lam: float = 0.5, prefill_tokens: Sequence[float] | np.ndarray | None = None,
                   keys: Sequence[Hashable] | None = None,
                   max_targets: int | None = None, context: bool = True) -> MigrationPlan:
    """Choose how many of the `n_from` cut actors continue the unfinished items, and bins.

    ``context`` (default on) adds the continuation's KV reads (see the module docstring);
    it changes nothing while ``profile.tpot_per_ctx_s`` is 0.
    """
    if n_from < 1:
        raise ValueError("n_from must be >= 1")
    work, members = migration_units(remaining, prefill_tokens, keys, context)
    if len(work) == 0:
        return MigrationPlan(n_targets=0, bins=[], table=[])
    upper = min(len(work), max(1, n_from - 1))
    if max_targets is not None:
        upper = max(1, min(upper, max_targets))
    decision = choose_from_candidates(work, range(1, upper + 1), profile, lam, warm=n_from)
    bins = [[i for unit in unit_bin for i in members[unit]] for unit_bin in decision.bins]
    return MigrationPlan(n_targets=decision.n, bins=bins, table=decision.table)

