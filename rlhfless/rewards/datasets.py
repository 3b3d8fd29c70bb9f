"""Prompt datasets and the deterministic per-step batch.

Every item is a dict with at least "id" (stable across epochs: the length predictor keys on
it), "prompt" (user text), "answer" (the ground truth: a string, "" when there is none, or
test cases for code rewards) and "system" (str or None). A chat prompt (verl's parquet schema)
also keeps its "messages". Files may carry further fields; `data_source` and `extra_info`
travel along in the reward's `meta`; "max_new_tokens" (a positive integer) is that prompt's
own response budget, capped by the job's `generation.maxNewTokens`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from rlhfless.rewards.arithmetic import generate_problems
from rlhfless.rewards.registry import (
    AnswerCheck,
    RewardSpecLike,
    answer_check,
    number_or_text,
)
from rlhfless.rewards.tables import TableError, open_hf_disk, open_parquet

# Short, distinct prompts a character-level tiny model handles; ids are stable.
REPEAT_PROMPTS = ("Say a:", "Hi!", "abc", "Go:", "xyz", "Tell me", "Q?", "ok", "Count:", "Run")


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the file and line."""


FILE_KINDS = ("parquet", "jsonl", "hf-disk")
# verl's parquet schema: the reward's ground truth, and what its compute_score also receives.
_ANSWER_DEFAULTS = ("reward_model.ground_truth", "answer")
VERL_META = ("data_source", "extra_info")
_ROLES = ("system", "user", "assistant")


class FieldsLike(Protocol):
    prompt: str
    answer: str | None
    id: str | None


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


def load_jsonl(
    path: str | Path,
    fields: FieldsLike | None = None,
    check_answer: AnswerCheck | None = None,
) -> list[dict[str, Any]]:
    """Read {"prompt": str | messages, "answer"?: str|number, "id"?: str, ...} per line.

    Blank lines are skipped; missing ids become "<file stem>-<line>"; a bad line, a missing
    or malformed prompt, a ground truth the reward cannot use (by default: anything but a
    string or a number) or a duplicate id raises DatasetError naming the line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason})") from None
    rows = _Rows(path, fields, check_answer)
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
        rows.add(record, where, f"{path.stem}-{lineno}", f"line {lineno}")
    return rows.done()


def load_table(
    kind: str,
    path: str | Path,
    fields: FieldsLike | None = None,
    check_answer: AnswerCheck | None = None,
    split: str = "train",
) -> list[dict[str, Any]]:
    """Rows of a parquet file (verl's schema by default) or a save_to_disk directory.

    Columns are checked before any data is read: a missing one raises DatasetError naming it,
    the spec field that names it, and the columns the file has.
    """
    path = Path(path)
    try:
        table = open_parquet(path) if kind == "parquet" else open_hf_disk(path, split)
    except TableError as exc:
        raise DatasetError(str(exc)) from None
    fields = fields or _DefaultFields()
    wanted = []
    for spec_field, column in (("prompt", fields.prompt), ("answer", fields.answer),
                               ("id", fields.id)):
        if column is None:
            continue
        top = column.split(".")[0]
        if top not in table.columns:
            raise DatasetError(
                f"{path}: no column '{top}' (dataset.fields.{spec_field} is '{column}'); "
                f"columns: {', '.join(table.columns) or '(none)'}")
        wanted.append(top)
    optional = [*_ANSWER_DEFAULTS, "id", *VERL_META]
    wanted += [c.split(".")[0] for c in optional if c.split(".")[0] in table.columns]
    try:
        records = table.read(list(dict.fromkeys(wanted)))
    except TableError as exc:
        raise DatasetError(str(exc)) from None
    rows = _Rows(path, fields, check_answer)
    for i, record in enumerate(records):
        rows.add(record, f"{path} row {i}", f"{path.stem}-{i}", f"row {i}")
    return rows.done()


def load_dataset(
    ds_spec: DatasetSpecLike, reward_spec: RewardSpecLike | None = None
) -> list[dict[str, Any]]:
    """The dataset a DatasetSpec describes; `size` applies to the built-in kinds only.

    With `reward_spec`, each file row's ground truth is checked against what that reward
    needs (a code_tests reward needs test cases, multiple_choice a letter, ...).
    """
    check = answer_check(reward_spec) if reward_spec is not None else None
    fields = getattr(ds_spec, "fields", None)
    if ds_spec.kind == "arithmetic":
        difficulty = getattr(ds_spec, "difficulty", 1)
        items: list[dict[str, Any]] = list(
            generate_problems(ds_spec.size, seed=ds_spec.seed, difficulty=difficulty)
        )
    elif ds_spec.kind == "repeat":
        items = repeat_prompts(ds_spec.size)
    elif ds_spec.kind in FILE_KINDS:
        if not ds_spec.path:
            raise DatasetError(f"dataset kind '{ds_spec.kind}' needs a path")
        if ds_spec.kind == "jsonl":
            items = load_jsonl(ds_spec.path, fields, check)
        else:
            items = load_table(ds_spec.kind, ds_spec.path, fields, check,
                               getattr(ds_spec, "split", "train"))
    else:
        raise DatasetError(f"unknown dataset kind '{ds_spec.kind}'; known: arithmetic, "
                           f"repeat, {', '.join(FILE_KINDS)}")
    return [{**item, "system": item.get("system", ds_spec.system_prompt)} for item in items]


def chat_messages(item: Mapping[str, Any], system_prompt: str | None = None
                  ) -> list[dict[str, str]]:
    """The conversation to render for `item`: its own messages (a verl chat prompt) or its
    user text, preceded by the system prompt unless the messages carry one already."""
    messages = [dict(m) for m in item.get("messages") or
                [{"role": "user", "content": item["prompt"]}]]
    system = item.get("system") or system_prompt
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def reward_meta(item: Mapping[str, Any]) -> dict[str, Any]:
    """What a reward sees besides the text: the ground truth, and verl's `data_source` and
    `extra_info` when the row has them."""
    meta = {"answer": item.get("answer")}
    meta.update({key: item[key] for key in VERL_META if item.get(key) is not None})
    return meta


class _DefaultFields:
    prompt = "prompt"
    answer: str | None = None
    id: str | None = None


class _Rows:
    """Normalises records into items (one place for jsonl and tables) and checks ids."""

    def __init__(self, path: Path, fields: FieldsLike | None, check: AnswerCheck | None):
        self.path = path
        self.fields = fields or _DefaultFields()
        self.check = check if check is not None else number_or_text
        self.items: list[dict[str, Any]] = []
        self.seen: dict[str, str] = {}

    def add(self, record: dict[str, Any], where: str, default_id: str, label: str) -> None:
        prompt_field = self.fields.prompt
        found, raw_prompt = _pick(record, prompt_field)
        if not found:
            raise DatasetError(f"{where}: no field '{prompt_field}' (dataset.fields.prompt)")
        item: dict[str, Any] = dict(record)
        if isinstance(raw_prompt, list | tuple):
            item["messages"] = _messages(raw_prompt, f"{where}: '{prompt_field}'")
            item["prompt"] = next(m["content"] for m in reversed(item["messages"])
                                  if m["role"] == "user")
        elif isinstance(raw_prompt, str) and raw_prompt:
            item["prompt"] = raw_prompt
        else:
            raise DatasetError(f"{where}: '{prompt_field}' must be a non-empty string or a "
                               "list of chat messages")
        answer_field, answer = self._answer(record, where)
        if isinstance(answer, int | float) and not isinstance(answer, bool):
            answer = str(answer)
        problem = self.check(answer)
        if problem is not None:
            raise DatasetError(f"{where}: '{answer_field}' {problem}")
        item["answer"] = "" if answer is None else answer
        budget = record.get("max_new_tokens")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                                   or budget < 1):
            raise DatasetError(f"{where}: 'max_new_tokens' must be a positive integer")
        id_field = self.fields.id or "id"
        found, raw_id = _pick(record, id_field)
        if not found and self.fields.id is not None:
            raise DatasetError(f"{where}: no field '{id_field}' (dataset.fields.id)")
        item_id = str(raw_id) if found and raw_id is not None else default_id
        if item_id in self.seen:
            raise DatasetError(
                f"{where}: duplicate id '{item_id}' (first on {self.seen[item_id]})")
        self.seen[item_id] = label
        item["id"] = item_id
        self.items.append(item)

    def _answer(self, record: dict[str, Any], where: str) -> tuple[str, Any]:
        if self.fields.answer is not None:
            found, value = _pick(record, self.fields.answer)
            if not found:
                raise DatasetError(
                    f"{where}: no field '{self.fields.answer}' (dataset.fields.answer)")
            return self.fields.answer, value
        for candidate in _ANSWER_DEFAULTS:
            found, value = _pick(record, candidate)
            if found:
                return candidate, value
        return _ANSWER_DEFAULTS[-1], None

    def done(self) -> list[dict[str, Any]]:
        if not self.items:
            raise DatasetError(f"{self.path}: no prompts found")
        return self.items


def _pick(record: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    """(found, value) of a dotted path into nested mappings."""
    node: Any = record
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _messages(raw: list[Any] | tuple[Any, ...], where: str) -> list[dict[str, str]]:
    if not raw:
        raise DatasetError(f"{where} is an empty message list")
    out = []
    for j, message in enumerate(raw):
        if not isinstance(message, Mapping):
            raise DatasetError(f"{where}[{j}] must be a {{role, content}} mapping")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES or not isinstance(content, str):
            raise DatasetError(f"{where}[{j}] needs a role ({', '.join(_ROLES)}) and a "
                               "string content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise DatasetError(f"{where}: the last message must be the user's")
    return out


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
