"""Multiple-choice answers (GPQA-style): the letter a response chose, found in free text.

Models state their choice in many ways ("The answer is (C)", "**C**", "Answer: c",
"\\boxed{B}", a last line "D."). Cues are tried from the most explicit to the weakest; within
one cue the last occurrence wins (a final answer comes after the reasoning). A lower-case
letter counts only where it cannot be an English word ("answer: c", "(c)", "**c**"), so
"the answer is a bit unclear" chooses nothing.
"""

from __future__ import annotations

import functools
import re
from typing import Any

DEFAULT_CHOICES = "ABCDE"


@functools.lru_cache(maxsize=16)
def _cues(choices: str) -> tuple[re.Pattern[str], ...]:
    up = f"[{re.escape(choices.upper())}]"
    any_case = f"[{re.escape(choices.upper() + choices.lower())}]"
    end = r"(?![A-Za-z0-9])"
    return (
        # \boxed{C}, \boxed{(c)}, \boxed{\text{C}}
        re.compile(rf"\\boxed\{{\s*(?:\\text\{{)?\s*\(?({any_case})\)?\s*\}}"),
        # "answer is (C)", "Answer: c", "final answer: **B**", "answer is option D"
        re.compile(rf"(?i:answer)\s*(?:(?i:is)\s*)?:?\s*(?:(?i:option|choice)\s*)?"
                   rf"(?:\(|\[|\*\*)\s*({any_case})\s*(?:\)|\]|\*\*)"),
        re.compile(rf"(?i:answer)\s*(?:(?i:is)\s*)?:?\s*(?:(?i:option|choice)\s*)?({up}){end}"),
        re.compile(rf"(?i:answer)\s*:\s*({any_case})\s*[.!]?\s*(?:$|\n)"),
        # **C**, **(C)**, **C.**
        re.compile(rf"\*\*\s*\(?({any_case})[).:]?\s*\*\*"),
        # a line that is only the letter: "C", "(C)", "C."
        re.compile(rf"(?m)^\s*\(?({up})[).:]?\s*$"),
        # "option C", "choice (D)"
        re.compile(rf"(?i:option|choice)\s+\(?({up}){end}"),
        # "(C)" anywhere
        re.compile(rf"\(({up})\)"),
    )


def extract_choice(text: str, choices: str = DEFAULT_CHOICES) -> str | None:
    """The upper-case letter `text` chose among `choices`, or None."""
    for cue in _cues(choices):
        found = cue.findall(text)
        if found:
            return found[-1].upper()
    return None


def normalize_choice(value: Any, choices: str = DEFAULT_CHOICES) -> str | None:
    """A ground truth as one upper-case letter: "C", "c", "(C)", "C." → "C"; else None."""
    if not isinstance(value, str):
        return None
    letter = value.strip().strip("().[] ").rstrip(".").strip().upper()
    return letter if len(letter) == 1 and letter in choices.upper() else None


def check_choice_ground_truth(value: Any, choices: str = DEFAULT_CHOICES) -> str | None:
    if normalize_choice(value, choices) is None:
        shown = repr(value) if isinstance(value, str) else type(value).__name__
        return f"must be one letter of {choices.upper()} for reward 'multiple_choice', got {shown}"
    return None


def multiple_choice(
    prompt: str,
    response: str,
    meta: dict[str, Any],
    choices: str = DEFAULT_CHOICES,
    score: float = 1.0,
) -> float:
    """`score` when the letter the response chose equals meta['answer'], else 0."""
    if not choices or not choices.isalpha() or len(set(choices.upper())) != len(choices):
        raise ValueError(f"multiple_choice: choices must be distinct letters, got {choices!r}")
    expected = normalize_choice(meta.get("answer"), choices)
    chosen = extract_choice(response, choices)
    return float(score) if chosen is not None and chosen == expected else 0.0
