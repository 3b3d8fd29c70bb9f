"""The streaming step's hand-off cut, estimated on the time model.

When an actor has finished a fraction τ of its own samples it hands every unfinished one
(prompt + partial response) to the still-running actor with the fewest samples in flight,
which merges them into its batch, and scales down at once; a sample moves at most once and
the last actor keeps its tail. Receivers pay re-prefill and carry the moved tails, so the cut
can lengthen the rollout — most when the actors with few samples in flight are exactly the
long-group actors that decide the makespan. `handoff_estimate` replays the cut on predicted
finish times so the actor-count choice and the learner plan see that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rlhfless.scheduling.profile import Profile
from rlhfless.scheduling.workmodel import Workload, sample_lengths, unit_finish_times


@dataclass(frozen=True)
class HandoffEstimate:
    """Predicted effect of the streaming hand-off cut on one assignment.

    ``ends``: when each actor (bin) is released — at its cut if it handed off, else when its
    own and any received work is done. ``finish``: when each unit is done (a moved unit ends
    with its receiver). ``receiver``: per bin, the bin it handed off to (-1: none).
    """

    ends: np.ndarray
    finish: np.ndarray
    receiver: np.ndarray

    @property
    def makespan(self) -> float:
        return float(self.ends.max()) if len(self.ends) else 0.0


def handoff_estimate(work: Workload, bins: Sequence[Sequence[int]], profile: Profile,
                     tau: float, bin_start_s: Sequence[float] | None = None
                     ) -> HandoffEstimate:
    """Replay the hand-off cut on the time model (an estimate, not a simulation).

    Units finish at `unit_finish_times`; each is spread into its sequences
    (`sample_spread`), a sequence of relative length x ending at x times its unit's finish.
    A bin cuts when a fraction tau of its sequences is done; cuts are taken in time order:
    its sequences still running move to the still-running bin with the fewest sequences in
    flight (a receiver is not cut again; the last bin keeps its tail). A moved sequence keeps
    the time it had left, delayed by the receiver's added work, and the receiver pays what
    the moved sequences add to its
    iterations — re-prefill of prompt + partial response, ``c`` per remaining token, ``k``
    per remaining context token — on top of its own work (the weights read, ``a`` per
    iteration, is shared).
    """
    if not 0 < tau <= 1:
        raise ValueError("tau must be in (0, 1]")
    n = len(bins)
    start = np.zeros(n) if bin_start_s is None else np.asarray(bin_start_s, dtype=float)
    unit_end = unit_finish_times(work, bins, profile)
    bin_of = np.full(len(work), -1)
    for b, members in enumerate(bins):
        idx = np.asarray(members, dtype=int)
        bin_of[idx] = b
        unit_end[idx] += start[bin_of[idx]]
    unit, length = sample_lengths(work)
    rel = length / np.maximum(work.lmax[unit], 1.0)
    owner = bin_of[unit]
    begin = start[np.maximum(owner, 0)]
    finish = begin + rel * (unit_end[unit] - begin)
    ends = start.copy()
    np.maximum.at(ends, owner[owner >= 0], finish[owner >= 0])
    receiver = np.full(n, -1)
    if tau < 1 and n > 1:
        _replay(work, profile, tau, unit, rel, owner, begin, finish, ends, receiver)
    done = np.zeros(len(work))
    np.maximum.at(done, unit, finish)
    return HandoffEstimate(ends, done, receiver)


def _replay(work: Workload, profile: Profile, tau: float, unit: np.ndarray, rel: np.ndarray,
            owner: np.ndarray, begin: np.ndarray, finish: np.ndarray, ends: np.ndarray,
            receiver: np.ndarray) -> None:
    """The cuts of `handoff_estimate`, in place on the per-sequence arrays."""
    n = len(ends)
    cuts = np.full(n, np.inf)
    for b in range(n):
        mine = np.sort(finish[owner == b])
        if len(mine):
            cuts[b] = mine[min(len(mine) - 1, max(0, int(np.ceil(tau * len(mine) - 1e-9)) - 1))]
    assert work.ctx is not None
    per_seq = np.maximum(work.seqs[unit], 1.0)
    prompt = work.prefill[unit]  # each moved sequence re-prefills its prompt
    length = rel * work.lmax[unit]
    ctx_share = work.ctx[unit] / per_seq
    rate, c, k = profile.prefill_tok_per_s, profile.tpot_per_seq_s, profile.tpot_per_ctx_s
    a_kv = 0.0 if profile.kv_tokens is None else profile.tpot_base_s / profile.kv_tokens
    # Work each bin carries (its own, then what it receives), for the KV-capacity floor.
    load = np.zeros(n)  # seconds of prefill + c·tokens + (k + a/kv_tokens)·ctx
    np.add.at(load, owner, prompt / per_seq / rate + c * length
              + (k + a_kv) * ctx_share)
    first = np.full(n, np.inf)
    np.minimum.at(first, owner, begin)
    released = np.zeros(n, dtype=bool)
    is_receiver = np.zeros(n, dtype=bool)
    for b in np.argsort(cuts, kind="stable"):
        t = cuts[b]
        if not np.isfinite(t) or is_receiver[b]:
            continue
        live = finish > t + 1e-9
        moving = np.flatnonzero(live & (owner == b))
        running = ~released & (ends > t)
        running[b] = False
        if len(moving) == 0:
            released[b], ends[b] = True, t
            continue
        if not running.any():
            continue  # the last actor keeps its tail
        inflight = np.bincount(owner[live], minlength=n)
        candidates = np.flatnonzero(running)
        r = int(candidates[np.argmin(inflight[candidates])])
        left = (finish[moving] - t) / np.maximum(finish[moving] - begin[moving], 1e-9)
        generated = (1.0 - left) * length[moving]
        ctx_left = float((ctx_share[moving] * (1 - (1 - left) ** 2)).sum())
        added = (float((prompt[moving] + generated).sum()) / rate
                 + c * float((left * length[moving]).sum()) + k * ctx_left)
        finish[moving] += added  # at the receiver's pace, after its extra work
        load[r] += added + a_kv * ctx_left
        # A receiver whose context outgrows its KV cache runs at least ctx / kv_tokens
        # iterations (sequences wait or are preempted).
        ends[r] = max(ends[r] + added, float(finish[moving].max()), first[r] + load[r])
        owner[moving] = r
        receiver[b], is_receiver[r] = r, True
        released[b], ends[b] = True, t
