"""Rule-based rewards: `fn(prompt, response, meta, **args) -> float`.

Every rule is total: any response text (empty, garbage, huge) gives a finite float, because a
policy early in training produces exactly that.
"""

from __future__ import annotations

import math
import re
from typing import Any

# A number as people write it: optional sign, digits with thousands commas, optional decimals.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_HASH_ANSWER = re.compile(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


def parse_number(text: str) -> float | None:
    """'1,234' -> 1234.0, '42.0' -> 42.0, '-7' -> -7.0; None if it is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_answer(text: str) -> float | None:
    """The GSM8K-style final answer: the number after the last '####', else the last number."""
    marked = _HASH_ANSWER.findall(text)
    candidates = marked if marked else _NUMBER.findall(text)
    for candidate in reversed(candidates):
        value = parse_number(candidate)
        if value is not None:
            return value
    return None


def _reference_answer(meta: dict[str, Any]) -> float | None:
    answer = meta.get("answer")
    if answer is None:
        return None
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        return float(answer)
    # A full GSM8K solution ("... #### 42") works as well as a bare "42".
    return extract_answer(str(answer))


def exact_match(
    prompt: str,
    response: str,
    meta: dict[str, Any],
    score: float = 1.0,
    format_score: float = 0.0,
    tol: float = 1e-6,
) -> float:
    """`score` if the response's final number equals meta['answer'] (within `tol`).

    A response that states some number but the wrong one gets `format_score`; one with no
    number at all gets 0.
    """
    predicted = extract_answer(response)
    if predicted is None:
        return 0.0
    expected = _reference_answer(meta)
    if expected is not None and abs(predicted - expected) <= tol * max(1.0, abs(expected)):
        return float(score)
    return float(format_score)


def format_reward(
    prompt: str,
    response: str,
    meta: dict[str, Any],
    pattern: str = r"####\s*-?\d[\d,]*(?:\.\d+)?",
    mode: str = "search",
    score: float = 1.0,
) -> float:
    """`score` if the response matches `pattern` (`mode` 'search' anywhere, 'fullmatch')."""
    if mode not in ("search", "fullmatch"):
        raise ValueError(f"format: mode must be 'search' or 'fullmatch', got '{mode}'")
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise ValueError(f"format: invalid pattern {pattern!r}: {exc}") from None
    found = regex.search(response) if mode == "search" else regex.fullmatch(response.strip())
    return float(score) if found else 0.0


def length_penalty(
    prompt: str,
    response: str,
    meta: dict[str, Any],
    target: int = 200,
    window: int | None = None,
    max_penalty: float = 1.0,
) -> float:
    """0 up to `target` characters, then linearly down to -max_penalty at target + window.

    `window` defaults to `target` (twice the target length costs the full penalty).
    """
    if target < 0:
        raise ValueError(f"length_penalty: target must be >= 0, got {target}")
    span = window if window is not None else max(target, 1)
    if span <= 0:
        raise ValueError(f"length_penalty: window must be > 0, got {span}")
    excess = max(0, len(response) - target)
    return -float(max_penalty) * min(1.0, excess / span)


def target_char(prompt: str, response: str, meta: dict[str, Any], char: str = "a") -> float:
    """Share of response characters equal to `char` (0 for an empty response).

    A toy reward a tiny random character-level model can learn within a few dozen steps.
    """
    if len(char) != 1:
        raise ValueError(f"target_char: char must be one character, got {char!r}")
    if not response:
        return 0.0
    return response.count(char) / len(response)
