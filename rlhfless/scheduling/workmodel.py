"""The time model of one actor bin, and a lower bound on the best makespan.

Work comes in *units* that must stay on one actor: a GRPO group (one prompt, G samples, the
prompt prefilled once and shared), or a bundle of migrated samples. A unit is four numbers:

* ``lmax``    decode iterations of its longest sequence (predicted),
* ``tokens``  decode tokens of all its sequences (a group: G × predicted length),
* ``seqs``    number of sequences (a group: G),
* ``prefill`` prompt tokens prefilled for it (a group: its prompt once — deduplicated prefill).
* ``ctx``     (optional, default 0) context-token iterations: Σ over its sequences and their
  decode iterations of the context held (prompt + tokens so far) — the KV-cache reads. A
  sequence of n tokens after a prompt of p reads ≈ n·p + n²/2 (`context_tokens`).

The context term is additive: with ``Profile.tpot_per_ctx_s = k`` a unit adds ``k·ctx``
seconds to its bin wherever it runs, exactly like its prefill, so it enters every formula
below next to ``prefill / prefill_tok_per_s`` (and the lower bounds stay valid). With k = 0
or ctx = 0 everything is as without it.

Bin time (one actor serving a set S of units, all admitted at once):

    T(S) = prefill(S) / prefill_tok_per_s + D(S)

    continuous batching (finished sequences leave the batch), tpot(b) = a + c·b:
        D(S) = a · max(lmax(S), tokens(S) / max_batch, ctx(S) / kv_tokens) + c · tokens(S)
    Each iteration costs a + c·(running sequences); summed over iterations the c-terms give
    c·tokens exactly and the a-terms give a·(number of iterations). Without a batch cap the
    iterations are the longest sequence's length, so D is exact; with a cap ``max_batch`` the
    engine needs at least tokens/max_batch iterations, and ``max(...)`` is the usual
    estimate of list scheduling on max_batch slots (exact up to the last wave). Likewise an
    iteration holds at most ``kv_tokens`` of context (``Profile.kv_tokens``), so a bin whose
    sequences read ctx(S) context tokens in all needs at least ctx/kv_tokens iterations.

    static batching (the bin is one batch until its longest sequence ends):
        D(S) = lmax(S) · tpot(seqs(S))            — "max decode steps × tpot(batch size)".

Both are governed by the longest sequence and the batch's tpot; they coincide when all
sequences in the bin have the same length and there is no cap.

Lower bound (valid for both models, because static D ≥ continuous D with no cap). Per unit
define the additive work ``w1 = prefill/rate + c·tokens`` and, with a cap,
``w2 = prefill/rate + (c + a/max_batch)·tokens`` and, with a KV capacity,
``w3 = prefill/rate + c·tokens + (a/kv_tokens)·ctx``. Then for every bin
T(S) ≥ w1(S) + a·lmax(S), T(S) ≥ w2(S) and T(S) ≥ w3(S). Sort the bins by their longest unit
m_1 ≥ m_2 ≥ … ≥ m_N: every unit longer than m_{j+1} sits in bins 1..j, so for each j

    j · C ≥ max( w1({lmax > m_{j+1}}) + a·(m_1 + … + m_j),  w2(…),  w3(…) ).

`lower_bound` finds the smallest C for which *some* sequence m_1 = max lmax ≥ m_2 ≥ …
satisfies all N constraints (greedy: each m_{j+1} as small as constraint j allows, which
is optimal because every constraint loosens as earlier maxima shrink), by bisection on C.
With a batch cap it adds that a long-headed bin cannot also be full (see `_pooled_bound`);
with static batching it also solves a relaxed instance exactly (see
`_static_exchange_bound`). `simple_lower_bound` is the textbook max(Σ work / N, largest
unit) with the same work definitions; `lower_bound` ≥ it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rlhfless.scheduling.profile import Profile


@dataclass(frozen=True, eq=False)
class Workload:
    """Units of work in the time model's terms (parallel float arrays, one entry per unit)."""

    lmax: np.ndarray
    tokens: np.ndarray
    seqs: np.ndarray
    prefill: np.ndarray
    ctx: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.lmax)
        if self.ctx is None:
            object.__setattr__(self, "ctx", np.zeros(n))
        for name in ("lmax", "tokens", "seqs", "prefill", "ctx"):
            arr = np.asarray(getattr(self, name), dtype=float)
            object.__setattr__(self, name, arr)  # accept lists; store float arrays
            if arr.shape != (n,):
                raise ValueError(f"{name}: expected shape ({n},), got {arr.shape}")
            if not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(f"{name}: values must be finite and >= 0")

    def __len__(self) -> int:
        return len(self.lmax)

    @classmethod
    def groups(cls, pred_lengths: Sequence[float] | np.ndarray, group_size: int,
               prompt_tokens: Sequence[float] | np.ndarray | None = None, *,
               lmax: Sequence[float] | np.ndarray | None = None,
               context: bool = False) -> Workload:
        """GRPO groups: G samples of predicted length each, prompt prefilled once.

        ``lmax``: the predicted longest sample per group (default: the predicted length —
        every sample as long as the mean). ``context``: fill ``ctx`` with the groups' KV
        reads (G samples of the predicted length after the prompt).
        """
        if group_size < 1:
            raise ValueError("group_size must be >= 1")
        lengths = np.asarray(pred_lengths, dtype=float).reshape(-1)
        prompt = (np.zeros_like(lengths) if prompt_tokens is None
                  else np.asarray(prompt_tokens, dtype=float).reshape(-1))
        longest = lengths if lmax is None else np.asarray(lmax, dtype=float).reshape(-1)
        ctx = group_size * context_tokens(prompt, lengths) if context else None
        return cls(lmax=longest, tokens=lengths * group_size,
                   seqs=np.full_like(lengths, float(group_size)), prefill=prompt, ctx=ctx)

    def with_lmax_floor(self, floor: float) -> Workload:
        """The same units, each planned to run at least ``floor`` decode iterations."""
        return Workload(np.maximum(self.lmax, floor), self.tokens, self.seqs, self.prefill,
                        self.ctx)

    def take(self, idx: Sequence[int] | np.ndarray) -> Workload:
        idx = np.asarray(idx, dtype=int)
        assert self.ctx is not None
        return Workload(self.lmax[idx], self.tokens[idx], self.seqs[idx], self.prefill[idx],
                        self.ctx[idx])


def context_tokens(prompt: float | np.ndarray, n: float | np.ndarray) -> float | np.ndarray:
    """Context tokens read over n decode iterations of one sequence after `prompt` tokens."""
    return n * prompt + 0.5 * n * n


def spread_lengths(lmax: np.ndarray, tokens: np.ndarray,
                   seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each unit as its sequences: (unit index, length) per sequence.

    A unit of G sequences has one of length ``lmax``; the other G − 1 share the rest of its
    tokens, spread evenly over ±50% around their mean (clipped to [1, lmax]). KV reads grow
    with the square of a length, so a group with one long sample reads far more than G
    samples of the mean length would.
    """
    n_seq = np.maximum(np.rint(np.asarray(seqs, dtype=float)).astype(int), 1)
    unit = np.repeat(np.arange(len(n_seq)), n_seq)
    rank = (np.arange(len(unit)) - np.repeat(np.cumsum(n_seq) - n_seq, n_seq)
            if len(unit) else np.zeros(0, dtype=int))
    n = n_seq[unit].astype(float)
    top = np.maximum(np.asarray(lmax, dtype=float)[unit], 1.0)
    rest = np.maximum(np.asarray(tokens, dtype=float)[unit] - top, 0.0) / np.maximum(n - 1, 1.0)
    offset = np.where(n > 2, (rank - 1) / np.maximum(n - 2, 1.0) - 0.5, 0.0)  # -0.5 .. 0.5
    length = np.where(rank == 0, top, np.clip(rest * (1.0 + offset), 1.0, top))
    return unit, length


def sample_lengths(work: Workload) -> tuple[np.ndarray, np.ndarray]:
    """`spread_lengths` of a workload's units."""
    return spread_lengths(work.lmax, work.tokens, work.seqs)


def spread_context(lmax: np.ndarray, tokens: np.ndarray, seqs: np.ndarray,
                   prompt: np.ndarray) -> np.ndarray:
    """Context tokens read per unit, its sequences spread as in `spread_lengths`, each after
    `prompt` tokens (per unit)."""
    unit, length = spread_lengths(lmax, tokens, seqs)
    reads = context_tokens(np.asarray(prompt, dtype=float)[unit], length)
    return np.bincount(unit, weights=reads, minlength=len(np.asarray(lmax)))


def additive_seconds(work: Workload, profile: Profile) -> np.ndarray:
    """Per-unit seconds that do not depend on the bin: prefill and KV (context) reads."""
    pre = work.prefill / profile.prefill_tok_per_s
    if profile.tpot_per_ctx_s:
        pre = pre + profile.tpot_per_ctx_s * work.ctx
    return pre


def as_workload(work: Workload | Sequence[float] | np.ndarray, group_size: int = 1,
                prompt_tokens: Sequence[float] | np.ndarray | None = None) -> Workload:
    """Accept a ready `Workload` or predicted lengths per GRPO group."""
    if isinstance(work, Workload):
        return work
    return Workload.groups(work, group_size, prompt_tokens)


def decode_time(profile: Profile, lmax: float | np.ndarray, tokens: float | np.ndarray,
                seqs: float | np.ndarray, ctx: float | np.ndarray = 0.0) -> float | np.ndarray:
    """Decode seconds of a bin with these totals (see the module docstring)."""
    a, c = profile.tpot_base_s, profile.tpot_per_seq_s
    if profile.batching == "static":
        return lmax * (a + c * seqs)
    steps = lmax if profile.max_batch is None else np.maximum(lmax, tokens / profile.max_batch)
    if profile.kv_tokens is not None:
        steps = np.maximum(steps, ctx / profile.kv_tokens)
    return a * steps + c * tokens


def unit_times(work: Workload, profile: Profile) -> np.ndarray:
    """Time of every unit alone on an actor."""
    return additive_seconds(work, profile) + decode_time(
        profile, work.lmax, work.tokens, work.seqs, work.ctx)


def bin_time(work: Workload, bin_: Sequence[int], profile: Profile) -> float:
    """Predicted seconds for one actor to prefill and decode the units in `bin_`."""
    if len(bin_) == 0:
        return 0.0
    idx = np.asarray(bin_, dtype=int)
    extra = profile.tpot_per_ctx_s * float(work.ctx[idx].sum()) if profile.tpot_per_ctx_s else 0.0
    return float(work.prefill[idx].sum() / profile.prefill_tok_per_s + extra + decode_time(
        profile, float(work.lmax[idx].max()), float(work.tokens[idx].sum()),
        float(work.seqs[idx].sum()), float(work.ctx[idx].sum())))


def bin_times(work: Workload, bins: Sequence[Sequence[int]], profile: Profile) -> np.ndarray:
    return np.array([bin_time(work, b, profile) for b in bins], dtype=float)


def unit_finish_times(work: Workload, bins: Sequence[Sequence[int]],
                      profile: Profile) -> np.ndarray:
    """Predicted seconds (from the bin's start) at which each unit's last sequence finishes.

    Continuous batching, every unit of a bin admitted at once, its sequences spread as in
    `spread_lengths`: a unit ends at iteration ``lmax``. By then the bin has paid its
    prefill, ``a`` per iteration, ``c`` per token decoded and ``k`` per context token read by
    every sequence up to that iteration (a sequence's prompt share is what makes its reads
    add up to the unit's ``ctx``). The times of a bin are scaled so that its last unit ends
    at `bin_time` (which adds the KV-capacity and batch-cap limits). Static batching: every
    unit ends with the bin.
    """
    out = np.zeros(len(work))
    a, c, k = profile.tpot_base_s, profile.tpot_per_seq_s, profile.tpot_per_ctx_s
    assert work.ctx is not None
    unit, length = sample_lengths(work)
    # Per-sequence prompt share p such that Σ_s (ℓ_s p + ℓ_s²/2) = ctx of the unit.
    sum_l = np.bincount(unit, weights=length, minlength=len(work))
    sum_l2 = np.bincount(unit, weights=0.5 * length * length, minlength=len(work))
    prompt = np.maximum(work.ctx - sum_l2, 0.0) / np.maximum(sum_l, 1.0)
    by_unit = np.split(np.arange(len(unit)), np.cumsum(np.bincount(unit, minlength=len(work)))[:-1])
    for bin_ in bins:
        if len(bin_) == 0:
            continue
        idx = np.asarray(bin_, dtype=int)
        total = bin_time(work, idx, profile)
        if profile.batching == "static":
            out[idx] = total
            continue
        seq = np.concatenate([by_unit[u] for u in idx])
        ell, p = length[seq], prompt[unit[seq]]
        n = work.lmax[idx][:, None]  # iteration at which each unit ends
        run = np.minimum(ell[None, :], n)  # iterations each sequence ran by then
        done_ctx = (run * p[None, :] + 0.5 * run * run).sum(axis=1) if k else 0.0
        pre = float(work.prefill[idx].sum()) / profile.prefill_tok_per_s
        raw = pre + a * work.lmax[idx] + c * run.sum(axis=1) + k * done_ctx
        top = float(raw.max())
        out[idx] = raw * (total / top) if top > 0 else 0.0
    return out


def makespan(work: Workload, bins: Sequence[Sequence[int]], profile: Profile) -> float:
    """Predicted time until the slowest actor is done (0 with no work)."""
    times = bin_times(work, bins, profile)
    return float(times.max()) if len(times) else 0.0


def _work_rates(profile: Profile) -> tuple[float, float]:
    """Per-token coefficients of w1 and w2 (see module docstring)."""
    c = profile.tpot_per_seq_s
    return c, c + _a_per_capped_token(profile)


def _a_per_capped_token(profile: Profile) -> float:
    if profile.batching == "continuous" and profile.max_batch is not None:
        return profile.tpot_base_s / profile.max_batch
    return 0.0


def _a_per_kv_token(profile: Profile) -> float:
    """Coefficient of ctx in w3 (0 without a KV capacity or with static batching)."""
    if profile.batching == "continuous" and profile.kv_tokens is not None:
        return profile.tpot_base_s / profile.kv_tokens
    return 0.0


class SortedRuns:
    """Units sorted longest first; the time of any contiguous run order[i:k] in O(1).

    Ties are broken by more tokens first, then by index, so results are deterministic.
    """

    def __init__(self, work: Workload, profile: Profile):
        m = len(work)
        self.size = m
        self.order = np.lexsort((np.arange(m), -work.tokens, -work.lmax))
        o = self.order
        # Python lists: scalar indexing is several times faster than on numpy arrays.
        self._len = work.lmax[o].tolist()
        self._pre = _prefix(additive_seconds(work, profile)[o])
        self._tok = _prefix(work.tokens[o])
        self._seq = _prefix(work.seqs[o])
        assert work.ctx is not None
        self._ctx = _prefix(work.ctx[o])
        self._a, self._c = profile.tpot_base_s, profile.tpot_per_seq_s
        self._static = profile.batching == "static"
        self._inv_b = None if profile.max_batch is None else 1.0 / profile.max_batch
        self._inv_k = None if profile.kv_tokens is None else 1.0 / profile.kv_tokens

    def time(self, i: int, k: int) -> float:
        """Bin time of order[i:k] (k > i); its longest unit is order[i]."""
        pre = self._pre[k] - self._pre[i]
        if self._static:
            return pre + self._len[i] * (self._a + self._c * (self._seq[k] - self._seq[i]))
        tokens = self._tok[k] - self._tok[i]
        steps = self._len[i] if self._inv_b is None else max(self._len[i], tokens * self._inv_b)
        if self._inv_k is not None:
            steps = max(steps, (self._ctx[k] - self._ctx[i]) * self._inv_k)
        return pre + self._a * steps + self._c * tokens

    def greedy_cuts(self, cap: float, n_bins: int) -> list[int] | None:
        """Cut points [0, k1, ..., size], each run as long as its time stays ≤ cap; or None.

        Exact feasibility test for contiguous splits: a run's time only grows when it is
        extended on either side, so taking the longest feasible first run never hurts.
        """
        m, cuts, i = self.size, [0], 0
        for _ in range(n_bins):
            if i == m:
                break
            if self.time(i, i + 1) > cap:
                return None
            lo, hi = i + 1, m  # invariant: time(i, lo) <= cap
            if self.time(i, hi) <= cap:
                lo = hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self.time(i, mid) <= cap:
                    lo = mid
                else:
                    hi = mid
            cuts.append(lo)
            i = lo
        return cuts if i == m else None

    def min_max_cuts(self, n_bins: int, lo: float = 0.0,
                     rel_tol: float = 1e-4) -> tuple[list[int], float]:
        """Contiguous split minimising the largest run time, by bisection on the cap.

        Returns (cuts, bound): ``bound`` is ``lo`` when a split within ``lo`` exists,
        otherwise a cap proven infeasible, i.e. a lower bound on every contiguous split.
        """
        if self.size == 0:
            return [0], lo
        cuts = self.greedy_cuts(lo, n_bins)
        if cuts is not None:
            return cuts, lo
        top = max(self.time(0, self.size), lo)
        # Good splits sit within a few percent of a good `lo`: grow the bracket from there
        # instead of bisecting all the way down from "everything in one bin".
        best, hi, step = None, top, 0.01
        while lo > 0 and lo * (1 + step) < top:
            hi = lo * (1 + step)
            best = self.greedy_cuts(hi, n_bins)
            if best is not None:
                break
            lo, step = hi, step * 4
        if best is None:
            hi = top
            best = self.greedy_cuts(hi, n_bins)
        assert best is not None  # one run holding everything fits in its own time
        while hi - lo > rel_tol * hi:
            mid = 0.5 * (lo + hi)
            trial = self.greedy_cuts(mid, n_bins)
            if trial is None:
                lo = mid
            else:
                hi, best = mid, trial
        return best, lo


def _prefix(x: np.ndarray) -> list[float]:
    return np.concatenate(([0.0], np.cumsum(x))).tolist()


def bound_parts(work: Workload, profile: Profile) -> tuple[float, float]:
    """(largest pooled total, largest single unit) behind `simple_lower_bound`.

    simple_lower_bound(work, N, profile) = max(total / N, unit) — split out so a sweep over
    N computes the sums once.
    """
    pre = additive_seconds(work, profile)
    r1, r2 = _work_rates(profile)
    total1 = float((pre + r1 * work.tokens).sum()) + profile.tpot_base_s * float(work.lmax.max())
    total2 = float((pre + r2 * work.tokens).sum())
    total3 = float((pre + r1 * work.tokens + _a_per_kv_token(profile) * work.ctx).sum())
    return max(total1, total2, total3), float(unit_times(work, profile).max())


def simple_lower_bound(work: Workload, n_bins: int, profile: Profile) -> float:
    """max(Σ work / N, largest single unit), work as in the module docstring."""
    if len(work) == 0:
        return 0.0
    _check_bins(n_bins)
    total, unit = bound_parts(work, profile)
    return max(total / n_bins, unit)


def lower_bound(work: Workload, n_bins: int, profile: Profile, rel_tol: float = 1e-6) -> float:
    """A lower bound on the makespan of *any* split of the units into n_bins bins."""
    if len(work) == 0:
        return 0.0
    _check_bins(n_bins)
    bound = _pooled_bound(work, n_bins, profile, rel_tol)
    if profile.batching == "static":
        bound = max(bound, _static_exchange_bound(work, n_bins, profile))
    return bound


def _pooled_bound(work: Workload, n_bins: int, profile: Profile, rel_tol: float) -> float:
    """Smallest C for which the pooled constraints of the module docstring can hold.

    With a batch cap there is one more family: a bin whose longest unit m is long pays
    a·m for its iterations but then holds at most (C − a·m)/c tokens, so its time is at
    least w2(S) + g(m) with g(m) = a·m − (a/max_batch)·(C − a·m)/c; bins with g > 0 add it.
    """
    a, c = profile.tpot_base_s, profile.tpot_per_seq_s
    a_cap = _a_per_capped_token(profile)
    order = np.argsort(-work.lmax, kind="stable")
    lengths = work.lmax[order]
    pre = additive_seconds(work, profile)[order]
    r1, r2 = _work_rates(profile)
    w1 = np.concatenate(([0.0], np.cumsum(pre + r1 * work.tokens[order])))
    w2 = np.concatenate(([0.0], np.cumsum(pre + r2 * work.tokens[order])))
    assert work.ctx is not None
    w3 = np.concatenate(([0.0], np.cumsum(pre + r1 * work.tokens[order]
                                          + _a_per_kv_token(profile) * work.ctx[order])))
    neg = -lengths  # ascending, for "how many units are strictly longer than v"
    m = len(work)

    def gain(length: float, cap: float) -> float:
        if a_cap == 0.0 or c == 0.0:
            return 0.0
        return max(0.0, a * length - a_cap * (cap - a * length) / c)

    def feasible(cap: float) -> bool:
        m_j = float(lengths[0])
        sum_m, sum_g = m_j, gain(m_j, cap)
        for j in range(1, n_bins + 1):
            budget = j * cap
            k = min(int(np.searchsorted(w1, budget - a * sum_m, "right")) - 1,
                    int(np.searchsorted(w2, budget - sum_g, "right")) - 1,
                    int(np.searchsorted(w3, budget, "right")) - 1)
            if k >= m:
                return True
            # Units longer than the j-th maximum must already fit in bins 1..j.
            if k < 0 or k < int(np.searchsorted(neg, -m_j, "left")) or j == n_bins:
                return False
            m_j = float(lengths[k])
            sum_m += m_j
            sum_g += gain(m_j, cap)
        return False

    lo = simple_lower_bound(work, n_bins, profile)
    if feasible(lo):
        return lo
    hi = max(lo, float(w1[-1] + a * lengths.sum()), float(w2[-1]), float(w3[-1])) * 2.0 + 1e-12
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return lo  # an infeasible C: every split's makespan exceeds it


def _static_exchange_bound(work: Workload, n_bins: int, profile: Profile) -> float:
    """Static batching: optimum of a relaxed instance, where contiguous splits are optimal.

    Give every unit the smallest prefill, context and sequence count of the instance (times can only
    drop). A bin's time then depends only on its unit count and longest unit, and for such
    times some optimal split is contiguous in longest-first order (refill the bins, ordered
    by their maxima, with the sorted units keeping each bin's count: no maximum grows). The
    exact contiguous bisection therefore bounds every split of the real instance.
    """
    n = len(work)
    relaxed = Workload(lmax=work.lmax, tokens=work.tokens,
                       seqs=np.full(n, float(work.seqs.min())),
                       prefill=np.full(n, float(work.prefill.min())),
                       ctx=np.full(n, float(work.ctx.min())))  # type: ignore[union-attr]
    start = simple_lower_bound(relaxed, n_bins, profile)
    _, bound = SortedRuns(relaxed, profile).min_max_cuts(n_bins, start, rel_tol=1e-6)
    return bound


def _check_bins(n_bins: int) -> None:
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
