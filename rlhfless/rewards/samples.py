"""Small offline datasets in verl's parquet schema, for the examples and the tests.

    gsm8k-verl.parquet   GSM8K-style word problems (the arithmetic generator), math reward
    code-tests.parquet   stdin/stdout programming problems with tests, code_tests reward
    choice.jsonl         four-option questions (GPQA-style letters), multiple_choice reward

verl's schema: `prompt` is a list of chat messages, `reward_model.ground_truth` the answer,
plus `data_source`, `ability` and `extra_info` ({split, index}). Written by
`python scripts/make_example_data.py [DIR]` (default examples/data); nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhfless.rewards.arithmetic import generate_problems

MATH_INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."
CODE_INSTRUCTION = ("Write a Python 3 program that reads the input from stdin and prints the "
                    "answer. Reply with the program in a ```python block.")


def math_rows(n: int = 64, seed: int = 0, difficulty: int = 1) -> list[dict[str, Any]]:
    rows = []
    for i, p in enumerate(generate_problems(n, seed=seed, difficulty=difficulty,
                                            instruction=MATH_INSTRUCTION)):
        rows.append({
            "data_source": "rlhfless/arithmetic",
            "prompt": [{"role": "user", "content": p["prompt"]}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": p["answer"]},
            "extra_info": {"split": "train", "index": i},
        })
    return rows


# (statement, input generator, reference solution on the input text)
_Problem = tuple[str, Callable[[random.Random], str], Callable[[str], str]]
_PROBLEMS: tuple[_Problem, ...] = (
    ("Read two integers a and b on one line and print a + b.",
     lambda r: f"{r.randint(-99, 99)} {r.randint(-99, 99)}\n",
     lambda s: str(sum(map(int, s.split())))),
    ("Read a line of text and print it reversed.",
     lambda r: "".join(r.choice("abcxyz") for _ in range(r.randint(1, 12))) + "\n",
     lambda s: s.strip()[::-1]),
    ("Read a word and print how many vowels (a, e, i, o, u) it has.",
     lambda r: "".join(r.choice("abeiouxyz") for _ in range(r.randint(1, 12))) + "\n",
     lambda s: str(sum(c in "aeiou" for c in s.strip()))),
    ("Read n, then n integers on the next line, and print the largest.",
     lambda r: (lambda xs: f"{len(xs)}\n{' '.join(map(str, xs))}\n")(
         [r.randint(-50, 50) for _ in range(r.randint(1, 8))]),
     lambda s: str(max(map(int, s.split()[1:])))),
    ("Read n and print n! (n factorial).",
     lambda r: f"{r.randint(0, 12)}\n",
     lambda s: str(_factorial(int(s)))),
    ("Read a word and print YES if it is a palindrome, else NO.",
     lambda r: r.choice(["abba", "level", "abc", "noon", "xyz", "racecar", "ab"]) + "\n",
     lambda s: "YES" if s.strip() == s.strip()[::-1] else "NO"),
    ("Read n integers on one line and print them sorted ascending, space separated.",
     lambda r: " ".join(str(r.randint(0, 20)) for _ in range(r.randint(1, 8))) + "\n",
     lambda s: " ".join(map(str, sorted(map(int, s.split()))))),
    ("Read n and print the sum 1 + 2 + ... + n.",
     lambda r: f"{r.randint(1, 1000)}\n",
     lambda s: str(int(s) * (int(s) + 1) // 2)),
)


def _factorial(n: int) -> int:
    out = 1
    for k in range(2, n + 1):
        out *= k
    return out


def code_rows(tests_per_problem: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(f"rlhfless-code:{seed}")
    rows = []
    for i, (statement, make_input, solve) in enumerate(_PROBLEMS):
        inputs = [make_input(rng) for _ in range(tests_per_problem)]
        tests = {"inputs": inputs, "outputs": [solve(x) + "\n" for x in inputs]}
        rows.append({
            "data_source": "rlhfless/code",
            "prompt": [{"role": "user", "content": f"{statement} {CODE_INSTRUCTION}"}],
            "ability": "code",
            "reward_model": {"style": "rule", "ground_truth": json.dumps(tests)},
            "extra_info": {"split": "train", "index": i},
        })
    return rows


# A reference program per problem (same order as _PROBLEMS): what a perfect policy writes.
REFERENCE_PROGRAMS = (
    "print(sum(map(int, input().split())))",
    "print(input().strip()[::-1])",
    "print(sum(c in 'aeiou' for c in input().strip()))",
    "input()\nprint(max(map(int, input().split())))",
    "import math\nprint(math.factorial(int(input())))",
    "w = input().strip()\nprint('YES' if w == w[::-1] else 'NO')",
    "print(' '.join(map(str, sorted(map(int, input().split())))))",
    "n = int(input())\nprint(n * (n + 1) // 2)",
)


def choice_rows(n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """Arithmetic questions with four options; the answer is the correct option's letter."""
    rng = random.Random(f"rlhfless-choice:{seed}")
    rows = []
    for i, p in enumerate(generate_problems(n, seed=seed, instruction=None)):
        right = int(p["answer"])
        options = {right}
        while len(options) < 4:
            options.add(max(0, right + rng.randint(-5, 5)))
        ordered = sorted(options, key=lambda _: rng.random())
        letters = "ABCD"
        listed = "\n".join(f"({letters[k]}) {v}" for k, v in enumerate(ordered))
        rows.append({
            "id": f"choice-{i}",
            "prompt": f"{p['prompt']}\n{listed}\nAnswer with the letter of the correct option.",
            "answer": letters[ordered.index(right)],
        })
    return rows


def write_samples(out_dir: str | Path) -> dict[str, Path]:
    """Write the three sample datasets into `out_dir`; returns name → path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "gsm8k": out / "gsm8k-verl.parquet",
        "code": out / "code-tests.parquet",
        "choice": out / "choice.jsonl",
    }
    pq.write_table(pa.Table.from_pylist(math_rows()), paths["gsm8k"])
    pq.write_table(pa.Table.from_pylist(code_rows()), paths["code"])
    paths["choice"].write_text("".join(json.dumps(r) + "\n" for r in choice_rows()))
    return paths
