"""Prompt datasets and the deterministic per-step batch.

Every item is a dict with at least "id" (stable across epochs: the length predictor keys on
it), "prompt" (user text), "answer" (str, "" when there is none) and "system" (str or None);
jsonl files may carry further fields, which travel along as the reward's `meta`, and
"max_new_tokens" (a positive integer): that prompt's own response budget, capped by the
job's `generation.maxNewTokens`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Protocol

from rlhfless.rewards.arithmetic import generate_problems

# Short, distinct prompts a character-level tiny model handles; ids are stable.
REPEAT_PROMPTS = ("Say a:", "Hi!", "abc", "Go:", "xyz", "Tell me", "Q?", "ok", "Count:", "Run")


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the file and line."""


class DatasetSpecLike(Protocol):
    kind: str
    path: str | None
    size: int
    seed: int
    system_prompt: str | None


def repeat_prompts(k: int) -> list[dict[str, Any]]:
    """`k` fixed short prompts (beyond the built-in ten: "p10:", "p11:", ...)."""
    prompts = [REPEAT_PROMPTS[i] if i < len(REPEAT_PROMPTS) else f"p{i}:" for i in range(k)]
    return [{"id": f"repeat-{i}", "prompt": p, "answer": ""} for i, p in enumerate(prompts)]


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read {"prompt": str, "answer"?: str|number, "id"?: str, ...} per line.

    Blank lines are skipped; missing ids become "<file stem>-<line>"; a bad line, a missing
    or non-string prompt, or a duplicate id raises DatasetError naming the line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason})") from None
    items: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise DatasetError(f"{where}: 'prompt' must be a non-empty string")
        answer = record.get("answer", "")
        if answer is None or isinstance(answer, dict | list | bool):
            raise DatasetError(f"{where}: 'answer' must be a string or a number")
        budget = record.get("max_new_tokens")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                                   or budget < 1):
            raise DatasetError(f"{where}: 'max_new_tokens' must be a positive integer")
        item_id = str(record.get("id", f"{path.stem}-{lineno}"))
        if item_id in seen:
            raise DatasetError(f"{where}: duplicate id '{item_id}' (first on line {seen[item_id]})")
        seen[item_id] = lineno
        items.append({**record, "id": item_id, "prompt": prompt, "answer": str(answer)})
    if not items:
        raise DatasetError(f"{path}: no prompts found")
    return items


def load_dataset(ds_spec: DatasetSpecLike) -> list[dict[str, Any]]:
    """The dataset a DatasetSpec describes; `size` applies to the built-in kinds only."""
    if ds_spec.kind == "arithmetic":
        difficulty = getattr(ds_spec, "difficulty", 1)
        items: list[dict[str, Any]] = list(
            generate_problems(ds_spec.size, seed=ds_spec.seed, difficulty=difficulty)
        )
    elif ds_spec.kind == "repeat":
        items = repeat_prompts(ds_spec.size)
    elif ds_spec.kind == "jsonl":
        if not ds_spec.path:
            raise DatasetError("dataset kind 'jsonl' needs a path")
        items = load_jsonl(ds_spec.path)
    else:
        raise DatasetError(f"unknown dataset kind '{ds_spec.kind}'; known: arithmetic, jsonl, "
                           "repeat")
    return [{**item, "system": item.get("system", ds_spec.system_prompt)} for item in items]


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"rlhfless-batches:{seed}:{epoch}").shuffle(order)
    return order


def batch_for_step(
    dataset: list[dict[str, Any]], step: int, prompts_per_step: int, seed: int
) -> list[dict[str, Any]]:
    """The prompts of RL step `step` (0-based): a pure function of its arguments.

    Steps walk through one seeded permutation per epoch, back to back, so every prompt is
    seen once per epoch and recurs in later epochs (which the length predictor relies on).
    A batch may straddle two epochs; with more prompts per step than the dataset holds, a
    prompt appears more than once in a batch.
    """
    if not dataset:
        raise ValueError("empty dataset")
    if step < 0 or prompts_per_step < 1:
        raise ValueError(f"need step >= 0 and prompts_per_step >= 1, got {step}, "
                         f"{prompts_per_step}")
    n = len(dataset)
    start = step * prompts_per_step
    orders: dict[int, list[int]] = {}
    batch = []
    for pos in range(start, start + prompts_per_step):
        epoch, offset = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = _epoch_order(n, seed, epoch)
        batch.append(dataset[orders[epoch][offset]])
    return batch
