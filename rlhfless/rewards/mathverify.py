"""[math] answer equivalence with math-verify: LaTeX, fractions, \\boxed{}, units stripped.

The comparison runs in helper processes (see `workers`) so that each call has a hard
deadline: a response that sends sympy into a very long simplification scores 0 after
`timeout_s` instead of stalling the reward function.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from rlhfless.rewards.workers import WorkerPool

_WORKER = Path(__file__).with_name("_mathverify_worker.py")
_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def math_pool() -> WorkerPool:
    """This process's math-verify workers (started on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = WorkerPool([sys.executable, "-I", str(_WORKER)])
        return _pool


def boxed_gold(answer: Any) -> str:
    """The ground truth as math-verify's gold: inside \\boxed{} unless it already is (as
    verl does), with surrounding $ signs dropped."""
    text = str(answer).strip().strip("$").strip()
    return text if "\\boxed" in text else "\\boxed{" + text + "}"


def math_equivalence(
    prompt: str,
    response: str,
    meta: dict[str, Any],
    timeout_s: float = 5.0,
    score: float = 1.0,
) -> float:
    """`score` when the response's final answer equals meta['answer'] mathematically
    (1/2 = 0.5 = \\frac{1}{2}; "10 \\text{cm}" = 10), else 0; 0 after `timeout_s` seconds."""
    if not timeout_s > 0:
        raise ValueError(f"math: timeout_s must be > 0, got {timeout_s}")
    answer = meta.get("answer")
    if answer is None or not str(answer).strip() or not response.strip():
        return 0.0
    reply = math_pool().call({"gold": boxed_gold(answer), "pred": response}, timeout_s)
    return float(score) if reply is not None and reply.get("equal") is True else 0.0
