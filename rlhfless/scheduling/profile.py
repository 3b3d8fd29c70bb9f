"""What one actor function costs: a small performance profile, and its online estimator.

`Profile` is the only place the scheduling policies learn about hardware:

* decode time per engine iteration (time per output token) is affine in the number of
  sequences decoding at once, ``tpot(b) = tpot_base_s + tpot_per_seq_s * b``. The base term is
  reading the weights once per iteration (memory bound), the per-sequence term is each
  sequence's matmul FLOPs and KV reads. A measured table is fitted to this law by least
  squares (`Profile.from_tpot_table`); samples measured at several contexts also give the
  context term below (`Profile.from_tpot_samples`).
* ``prefill_tok_per_s``: prompt tokens per second of prefill.
* ``cold_start_s``: from "scale up" to "ready to serve" (container, weights, engine init).
* ``keep_alive_s``: idle seconds an instance stays (billed) before it scales to zero.
* ``gpus_per_actor``: GPUs billed per instance.
* ``max_batch``: sequences an engine decodes at once (KV-cache bound); None = unlimited.
* ``batching``: "continuous" — finished sequences leave the batch (vLLM; our transformers
  engine also drops finished rows); "static" — the whole bin is one batch until its longest
  sequence ends. `rlhfless.scheduling.workmodel` turns these into bin times.
* ``kv_tokens`` (optional): KV-cache tokens one instance holds. An iteration holds at most
  that much context, so a bin of continuous batching needs at least Σ context / kv_tokens
  iterations (sequences wait for memory, or are preempted and recomputed). None = unlimited.
* ``tpot_per_ctx_s`` (optional, default 0): seconds per iteration per context token held by
  the running sequences — the KV-cache reads, which grow as contexts grow. With it an
  iteration costs ``a + c·b + k·(Σ context of the b sequences)``; a tpot(b) table measured at
  a fixed context folds this into ``c``, which under-predicts bins of long sequences. 0 keeps
  the affine law (and every caller that does not know about it) unchanged.

`ProfileEstimator` refines a prior profile from what the driver measures:

* ``observe_generation(seconds, decode_steps, tokens, prefill_tokens, context_tokens)`` per
  actor call, where ``tokens`` is the number of sequence-iterations decoded (Σ over iterations
  of running sequences; with continuous batching that is the number of new tokens, with static
  batching ``batch_size * decode_steps``) and ``context_tokens`` the context read over those
  iterations (Σ over iterations of the running sequences' prompt + tokens so far; 0 when the
  engine does not report it, which leaves ``tpot_per_ctx_s`` at its prior). The model is
  ``seconds = prefill_tokens / prefill_tok_per_s + a * decode_steps + c * tokens
  + k * context_tokens``, fitted by
  ridge regression on *relative* residuals, pulled toward the prior (which weighs as
  ``prior_weight`` observations in each coefficient, however far off it is) and with
  exponential forgetting (``forget``) so the estimate follows a drifting system. A
  coefficient never observed keeps its prior; all stay ≥ 0.1% of the prior so a noisy fit
  never makes work free.
* ``observe_decode(batch_size, decode_steps, seconds)``: the constant-batch special case.
* ``observe_cold_start(seconds)``: forgetting mean of cold starts, with the prior as
  ``prior_weight`` pseudo-observations.

All state is plain floats (``state_dict`` is JSON-serialisable) so a resumed job keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

Batching = Literal["continuous", "static"]

# Floor for fitted coefficients, as a fraction of the prior's value.
_COEF_FLOOR = 1e-3


@dataclass(frozen=True)
class Profile:
    """Performance and billing facts of one actor function instance.

    Defaults are a 7B dense model (bf16) on one H100 with vLLM: weights 15 GB read per
    iteration at ~2.7 TB/s ≈ 6 ms + ~1.5 ms engine overhead; ~15 GFLOP per sequence-token at
    ~50% of 989 TFLOP/s ≈ 0.03 ms plus KV reads ≈ 0.01 ms; prefill at ~20k tokens/s.
    """

    tpot_base_s: float = 0.0075
    tpot_per_seq_s: float = 4.0e-5
    prefill_tok_per_s: float = 20_000.0
    cold_start_s: float = 30.0
    keep_alive_s: float = 30.0
    gpus_per_actor: int = 1
    max_batch: int | None = None
    batching: Batching = "continuous"
    tpot_per_ctx_s: float = 0.0
    kv_tokens: float | None = None

    def __post_init__(self) -> None:
        if self.tpot_base_s < 0 or self.tpot_per_seq_s < 0 or self.tpot_per_ctx_s < 0:
            raise ValueError("tpot coefficients must be >= 0")
        if self.tpot_base_s == 0 and self.tpot_per_seq_s == 0:
            raise ValueError("tpot must be positive for some batch size")
        if self.prefill_tok_per_s <= 0:
            raise ValueError("prefill_tok_per_s must be > 0")
        if self.cold_start_s < 0 or self.keep_alive_s < 0:
            raise ValueError("cold_start_s and keep_alive_s must be >= 0")
        if self.gpus_per_actor < 0:
            raise ValueError("gpus_per_actor must be >= 0")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError("max_batch must be >= 1 or None")
        if self.kv_tokens is not None and not self.kv_tokens > 0:
            raise ValueError("kv_tokens must be > 0 or None")
        if self.batching not in ("continuous", "static"):
            raise ValueError("batching must be 'continuous' or 'static'")

    def tpot(self, batch: float | np.ndarray) -> float | np.ndarray:
        """Seconds per decode iteration with `batch` sequences running."""
        return self.tpot_base_s + self.tpot_per_seq_s * batch

    @classmethod
    def from_tpot_table(cls, table: Mapping[float, float], **fields: Any) -> Profile:
        """Fit ``tpot(b) = a + c*b`` to measured {batch size: seconds per iteration}.

        Least squares, then clipped to a, c ≥ 0 (refitting the other coefficient alone) so
        the law stays physical when a table is noisy or flat.
        """
        if not table:
            raise ValueError("empty tpot table")
        b = np.asarray(list(table.keys()), dtype=float)
        t = np.asarray(list(table.values()), dtype=float)
        if len(b) == 1 or np.ptp(b) == 0:
            a, c = float(t.mean()), 0.0
        else:
            c, a = np.polyfit(b, t, 1)
            if c < 0:
                a, c = float(t.mean()), 0.0
            elif a < 0:
                a, c = 0.0, float((b @ t) / (b @ b))
        return cls(tpot_base_s=float(a), tpot_per_seq_s=float(c), **fields)

    @classmethod
    def from_tpot_samples(cls, samples: Sequence[Sequence[float]], **fields: Any) -> Profile:
        """Fit ``tpot = a + c·b + k·context`` to measured rows ``(batch, context, seconds)``.

        ``context`` is the total context tokens the ``batch`` running sequences hold (their
        KV cache read by the iteration). Non-negative least squares (a coefficient that would
        go negative is dropped and the rest refitted), so a noisy table stays physical. Rows
        all at one context give k = 0 (and the same a, c as `from_tpot_table`).
        """
        rows = np.asarray(samples, dtype=float)
        if rows.ndim != 2 or rows.shape[1] != 3 or len(rows) == 0:
            raise ValueError("tpot samples must be rows of (batch, context_tokens, seconds)")
        if not np.all(np.isfinite(rows)) or np.any(rows < 0):
            raise ValueError("tpot samples must be finite and >= 0")
        design = np.column_stack([np.ones(len(rows)), rows[:, 0], rows[:, 1]])
        coef = _nonneg_lstsq(design, rows[:, 2])
        if coef[0] == 0 and coef[1] == 0:
            raise ValueError("tpot samples give no positive batch law")
        return cls(tpot_base_s=float(coef[0]), tpot_per_seq_s=float(coef[1]),
                   tpot_per_ctx_s=float(coef[2]), **fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        return cls(**dict(data))


def _nonneg_lstsq(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (active set over at most 3 columns)."""
    n = design.shape[1]
    active = [j for j in range(n) if np.ptp(design[:, j]) > 0 or j == 0]
    coef = np.zeros(n)
    while active:
        sol, *_ = np.linalg.lstsq(design[:, active], target, rcond=None)
        if np.all(sol >= 0):
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


class ProfileEstimator:
    """Online estimate of a `Profile` from measured actor calls and cold starts."""

    # Coefficient order in the regression: prefill seconds/token, a, c, k (context).
    _N = 4

    def __init__(self, prior: Profile | None = None, prior_weight: float = 1.0,
                 forget: float = 0.95):
        if prior_weight <= 0:
            raise ValueError("prior_weight must be > 0")
        if not 0 < forget <= 1:
            raise ValueError("forget must be in (0, 1]")
        self.prior = prior or Profile()
        self.prior_weight = float(prior_weight)
        self.forget = float(forget)
        # Sufficient statistics of the regression on rows feature/seconds, target 1.
        self._xtx = np.zeros((self._N, self._N))
        self._xty = np.zeros(self._N)
        self._n = 0.0  # forgetting-weighted number of generation observations
        self._cold_sum = 0.0
        self._cold_n = 0.0
        self.n_generation = 0
        self.n_cold_start = 0

    def _theta0(self) -> np.ndarray:
        p = self.prior
        return np.array([1.0 / p.prefill_tok_per_s, p.tpot_base_s, p.tpot_per_seq_s,
                         p.tpot_per_ctx_s])

    def observe_generation(self, seconds: float, decode_steps: float, tokens: float,
                           prefill_tokens: float = 0.0, context_tokens: float = 0.0) -> None:
        """One actor call: wall seconds, decode iterations, sequence-iterations, prompt tokens
        and (if the engine reports it) context tokens read."""
        if not (seconds > 0 and np.isfinite(seconds)):
            return  # nothing to learn from a zero or broken timing
        feats = np.array([prefill_tokens, decode_steps, tokens, context_tokens], dtype=float)
        if np.any(feats < 0) or not np.all(np.isfinite(feats)) or not feats.any():
            return
        # Relative residuals: every call counts the same whatever its size.
        z = feats / seconds
        self._xtx = self.forget * self._xtx + np.outer(z, z)
        self._xty = self.forget * self._xty + z
        self._n = self.forget * self._n + 1.0
        self.n_generation += 1

    def observe_decode(self, batch_size: float, decode_steps: float, seconds: float) -> None:
        """Pure decode at a constant batch size (no prefill in `seconds`)."""
        self.observe_generation(seconds, decode_steps, batch_size * decode_steps, 0.0)

    def observe_cold_start(self, seconds: float) -> None:
        if not (seconds >= 0 and np.isfinite(seconds)):
            return
        self._cold_sum = self.forget * self._cold_sum + float(seconds)
        self._cold_n = self.forget * self._cold_n + 1.0
        self.n_cold_start += 1

    def _coefficients(self) -> np.ndarray:
        """(seconds per prefill token, a, c, k): ridge fit toward the prior, floored.

        Minimises Σ (1 − θ·f/seconds)² + w Σ_j d_j (θ_j − θ0_j)², where d_j is the mean of
        (f_j/seconds)² over the observations: the prior weighs as ``prior_weight``
        observations in every coordinate, however far off it is. Solved in coordinates
        scaled by √d_j (well conditioned); a coefficient never observed keeps its prior.
        """
        theta0 = self._theta0()
        if self._n <= 0:
            return theta0
        w = self.prior_weight
        floor = _COEF_FLOOR * theta0
        info = np.diag(self._xtx) / self._n
        free = info > 0
        theta = theta0.copy()
        # Active set: pin coefficients that fall under their floor, refit the others.
        for _ in range(self._N):
            idx, pinned = np.flatnonzero(free), np.flatnonzero(~free)
            if len(idx) == 0:
                break
            scale = 1.0 / np.sqrt(info[idx])
            lhs = scale[:, None] * self._xtx[np.ix_(idx, idx)] * scale[None, :]
            rhs = scale * (self._xty[idx] - self._xtx[np.ix_(idx, pinned)] @ theta[pinned])
            sol = scale * np.linalg.solve(lhs + w * np.eye(len(idx)),
                                          rhs + w * theta0[idx] / scale)
            theta[idx] = sol
            low = idx[sol < floor[idx]]
            if len(low) == 0:
                break
            free[low] = False
            theta[low] = floor[low]
        return np.maximum(theta, floor)

    def profile(self) -> Profile:
        """The current estimate (billing fields, max_batch and batching come from the prior)."""
        theta = self._coefficients()
        w = self.prior_weight
        cold = (w * self.prior.cold_start_s + self._cold_sum) / (w + self._cold_n)
        return replace(
            self.prior,
            prefill_tok_per_s=float(1.0 / theta[0]),
            tpot_base_s=float(theta[1]),
            tpot_per_seq_s=float(theta[2]),
            tpot_per_ctx_s=float(theta[3]),
            cold_start_s=float(cold),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "prior": self.prior.to_dict(),
            "prior_weight": self.prior_weight,
            "forget": self.forget,
            "xtx": self._xtx.tolist(),
            "xty": self._xty.tolist(),
            "n": self._n,
            "cold_sum": self._cold_sum,
            "cold_n": self._cold_n,
            "n_generation": self.n_generation,
            "n_cold_start": self.n_cold_start,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prior = Profile.from_dict(state["prior"])
        self.prior_weight = float(state["prior_weight"])
        self.forget = float(state["forget"])
        # A state saved before the context coefficient existed has 3 coefficients: pad.
        xtx = np.asarray(state["xtx"], dtype=float)
        xty = np.asarray(state["xty"], dtype=float).reshape(-1)
        k = len(xty)
        self._xtx = np.zeros((self._N, self._N))
        self._xty = np.zeros(self._N)
        self._xtx[:k, :k] = xtx.reshape(k, k)
        self._xty[:k] = xty
        self._n = float(state["n"])
        self._cold_sum = float(state["cold_sum"])
        self._cold_n = float(state["cold_n"])
        self.n_generation = int(state["n_generation"])
        self.n_cold_start = int(state["n_cold_start"])
