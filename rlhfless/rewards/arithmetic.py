"""Seeded, offline arithmetic word problems (GSM8K-flavoured, much easier).

Difficulty 1-3 are one-step problems with growing numbers; 4-5 chain two steps.
The same (n, seed, difficulty) always gives the same problems, ids included.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES = ("Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jia", "Kofi",
         "Lena", "Mateo", "Nia", "Omar", "Priya")
OBJECTS = ("apples", "marbles", "books", "stickers", "pencils", "cookies", "coins", "shells",
           "cards", "stamps", "balloons", "candles")
INSTRUCTION = "Give the final answer after '####'."

# Largest operand per difficulty; multiplication uses smaller factors so answers stay small.
_MAX_OPERAND = {1: 9, 2: 20, 3: 100, 4: 50, 5: 500}
_MAX_FACTOR = {1: 5, 2: 9, 3: 12, 4: 9, 5: 20}

_Step = tuple[str, int]  # (sentence, new total)


def _other_name(rng: random.Random, name: str) -> str:
    return rng.choice([n for n in NAMES if n != name])


def _add(rng: random.Random, name: str, obj: str, have: int, difficulty: int) -> _Step:
    b = rng.randint(1, _MAX_OPERAND[difficulty])
    other = _other_name(rng, name)
    text = rng.choice((
        f"{other} gives {name} {b} more {obj}.",
        f"{name} finds {b} more {obj}.",
        f"{name} buys {b} more {obj}.",
    ))
    return text, have + b


def _sub(rng: random.Random, name: str, obj: str, have: int, difficulty: int) -> _Step:
    b = rng.randint(1, max(1, have))  # never below zero
    other = _other_name(rng, name)
    text = rng.choice((
        f"{name} gives {b} {obj} to {other}.",
        f"{name} loses {b} {obj}.",
        f"{name} uses {b} {obj}.",
    ))
    return text, have - b


def _mul(rng: random.Random, name: str, obj: str, have: int, difficulty: int) -> _Step:
    k = rng.randint(2, _MAX_FACTOR[difficulty])
    text = rng.choice((
        f"Then {name}'s collection grows to {k} times as many {obj}.",
        f"{name} ends up with {k} times as many {obj} as before.",
    ))
    return text, have * k


_OPS: tuple[Callable[[random.Random, str, str, int, int], _Step], ...] = (_add, _sub, _mul)


def _problem(rng: random.Random, difficulty: int) -> tuple[str, int]:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    have = rng.randint(1, _MAX_OPERAND[difficulty])
    sentences = [f"{name} has {have} {obj}."]
    for _ in range(2 if difficulty >= 4 else 1):
        sentence, have = rng.choice(_OPS)(rng, name, obj, have, difficulty)
        sentences.append(sentence)
    sentences.append(f"How many {obj} does {name} have now?")
    return " ".join(sentences), have


def generate_problems(
    n: int, seed: int = 0, difficulty: int = 1, instruction: str | None = INSTRUCTION
) -> list[dict[str, str]]:
    """`n` problems as {"id", "prompt", "answer"}; the answer is a non-negative integer string."""
    if difficulty not in _MAX_OPERAND:
        raise ValueError(f"difficulty must be 1..5, got {difficulty}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"rlhfless-arithmetic:{seed}:{difficulty}")
    out = []
    for i in range(n):
        question, answer = _problem(rng, difficulty)
        prompt = f"{question} {instruction}" if instruction else question
        out.append({"id": f"arith-d{difficulty}-s{seed}-{i}", "prompt": prompt,
                    "answer": str(answer)})
    return out
