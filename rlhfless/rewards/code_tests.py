"""[code_tests] a response's Python program, run against input/output tests in a sandbox.

The ground truth is a set of stdin/stdout tests, in any of the shapes code datasets use:
    {"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}        (APPS, verl's prime_code)
    [{"input": "1 2\\n", "output": "3\\n"}, ...]
or either one as a JSON string (how parquet files usually store it). The program is the last
```python fenced block of the response (else the last fenced block, else the whole text).
Score: the share of tests whose output matches (line by line, trailing spaces ignored).
"""

from __future__ import annotations

import json
import re
from typing import Any

from rlhfless.rewards.sandbox import SandboxLimits, run_python

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
Tests = list[tuple[str, str]]


class TestsError(ValueError):
    """A ground truth that is not a set of input/output tests."""


def parse_tests(value: Any) -> Tests:
    """(stdin, expected stdout) pairs from any accepted shape; TestsError says what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise TestsError(f"is a string but not JSON test cases ({exc.msg})") from None
    if isinstance(value, dict):
        if value.get("fn_name"):
            raise TestsError("holds function-call tests (fn_name); code_tests runs stdin/stdout "
                             "programs")
        inputs, outputs = value.get("inputs"), value.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            raise TestsError("needs 'inputs' and 'outputs' lists")
        if len(inputs) != len(outputs):
            raise TestsError(f"has {len(inputs)} inputs but {len(outputs)} outputs")
        pairs = list(zip(inputs, outputs, strict=True))
    elif isinstance(value, list):
        pairs = []
        for i, case in enumerate(value):
            if not isinstance(case, dict) or "input" not in case or "output" not in case:
                raise TestsError(f"[{i}] needs 'input' and 'output'")
            pairs.append((case["input"], case["output"]))
    else:
        raise TestsError(f"must be test cases ({{inputs, outputs}} or [{{input, output}}]), "
                         f"got {type(value).__name__}")
    if not pairs:
        raise TestsError("holds no tests")
    for i, (stdin, stdout) in enumerate(pairs):
        if not isinstance(stdin, str) or not isinstance(stdout, str):
            raise TestsError(f"test {i}: input and output must be strings")
    return pairs


def check_tests_ground_truth(value: Any) -> str | None:
    try:
        parse_tests(value)
    except TestsError as exc:
        return f"{exc} (reward 'code_tests')"
    return None


def extract_program(response: str) -> str:
    """The last ```python block, else the last fenced block, else the whole response."""
    blocks = _FENCE.findall(response)
    python = [code for lang, code in blocks if lang.lower() in ("python", "python3", "py")]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else response


def _compiles(program: str) -> bool:
    """Syntax check here (compiling runs nothing): garbage costs no sandbox start."""
    try:
        compile(program, "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False
    return True


def same_output(actual: str, expected: str) -> bool:
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.strip().splitlines()]

    return lines(actual) == lines(expected)


def code_tests(
    prompt: str,
    response: str,
    meta: dict[str, Any],
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_kb: int = 1024,
) -> float:
    """Share of meta['answer']'s tests the response's program passes (0 when it has none,
    does not compile, or misbehaves: every test runs in a fresh sandbox with these limits)."""
    try:
        limits = SandboxLimits(timeout_s=float(timeout_s), memory_mb=int(memory_mb),
                               max_output_bytes=int(max_output_kb) * 1024)
    except ValueError as exc:
        raise ValueError(f"code_tests: {exc}") from None
    program = extract_program(response)
    if not program.strip() or meta.get("answer") in (None, "") or not _compiles(program):
        return 0.0
    tests = parse_tests(meta["answer"])
    passed = 0
    for stdin, expected in tests:
        result = run_python(program, stdin, limits)
        if result.ok and same_output(result.stdout.decode("utf-8", "replace"), expected):
            passed += 1
    return passed / len(tests)
