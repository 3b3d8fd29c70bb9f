"""The reward registry and the batch entry point the reward function calls.

Built-in rewards live in `REWARDS`; users add theirs as Python entry points in the
`rlhfless.rewards` group of a package installed into the image (see `plugins`). A spec names
a reward, never a module path, so nothing a job file says is ever imported.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from rlhfless.registry import lookup
from rlhfless.rewards.choice import check_choice_ground_truth, multiple_choice
from rlhfless.rewards.code_tests import check_tests_ground_truth, code_tests
from rlhfless.rewards.mathverify import math_equivalence
from rlhfless.rewards.plugins import load_plugin, plugin_entry_points
from rlhfless.rewards.rules import exact_match, format_reward, length_penalty, target_char


class RewardFn(Protocol):
    def __call__(self, prompt: str, response: str, meta: dict[str, Any], **args: Any) -> float:
        ...


class RewardSpecLike(Protocol):
    name: str
    args: dict[str, Any]


# A ground-truth check returns what is wrong with a dataset row's answer, or None.
AnswerCheck = Callable[[Any], str | None]


def number_or_text(value: Any) -> str | None:
    """Rule rewards compare with a string or a number ("" or missing: nothing to match)."""
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return None
    return f"must be a string or a number, got {type(value).__name__}"


def _math_ground_truth(value: Any) -> str | None:
    problem = number_or_text(value)
    if problem is None and (value is None or not str(value).strip()):
        return "is missing or empty; reward 'math' needs an answer to compare with"
    return problem and f"{problem} (reward 'math')"


def _components(args: Mapping[str, Any]) -> list[tuple[str, float, dict[str, Any]]]:
    """combined's args as (name, weight, args) triples; accepts two spellings:
    components: [{name, weight, args}]  or  weights: {name: weight} (+ optional per-name args
    under `args: {name: {...}}`)."""
    if "components" in args:
        out = []
        for i, comp in enumerate(args["components"]):
            if not isinstance(comp, Mapping) or "name" not in comp:
                raise ValueError(f"combined: components[{i}] needs a 'name'")
            out.append((comp["name"], float(comp.get("weight", 1.0)), dict(comp.get("args", {}))))
        return out
    if "weights" in args:
        per_name = args.get("args", {})
        return [(n, float(w), dict(per_name.get(n, {}))) for n, w in args["weights"].items()]
    raise ValueError("combined: give 'components' [{name, weight, args}] or 'weights' {name: w}")


def combined(prompt: str, response: str, meta: dict[str, Any], **args: Any) -> float:
    """Weighted sum of other registered rewards, e.g.
    {"weights": {"exact_match": 1.0, "format": 0.1}} or
    {"components": [{"name": "length_penalty", "weight": 0.5, "args": {"target": 50}}]}."""
    total = 0.0
    for name, weight, comp_args in _components(args):
        if name == "combined":
            raise ValueError("combined: a component cannot itself be 'combined'")
        total += weight * get_reward(name)(prompt, response, meta, **comp_args)
    return total


def reward_model(prompt: str, response: str, meta: dict[str, Any]) -> float:
    """A reward model (`reward.model`), scored by its own stage function, the scorer
    (`rlhfless.functions.scorer`): registered so that a spec may name it, never called on
    text here."""
    raise ValueError("reward 'reward_model' is scored by the scorer stage with reward.model, "
                     "not by the rule-based reward function")


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "format": format_reward,
    "length_penalty": length_penalty,
    "target_char": target_char,
    "combined": combined,
    "math": math_equivalence,
    "multiple_choice": multiple_choice,
    "code_tests": code_tests,
    "reward_model": reward_model,
}
# Rewards that are not text rules: they take no part in `combined` and have no dry run.
MODEL_REWARDS = {"reward_model"}
# What each built-in reward needs from a dataset row's ground truth (absent: anything goes).
ANSWER_CHECKS: dict[str, Callable[..., str | None]] = {
    "exact_match": number_or_text,
    "math": _math_ground_truth,
    "multiple_choice": check_choice_ground_truth,
    "code_tests": check_tests_ground_truth,
}
# Rewards that wait on other processes (sandboxed programs, a math worker): the items of a
# batch are scored side by side on a thread pool, so one slow response never holds the rest.
CONCURRENT = {"math", "code_tests"}


def get_reward(name: str) -> RewardFn:
    """The registered reward (built-in first, then installed entry points); an unknown name
    raises ValueError listing the known ones."""
    if name in REWARDS:
        return REWARDS[name]
    installed = plugin_entry_points()
    if name not in installed:
        lookup({**REWARDS, **dict.fromkeys(installed)}, name, "reward")  # raises, listing all
    return load_plugin(name)


def answer_check(reward_spec: RewardSpecLike) -> AnswerCheck:
    """What `reward_spec`'s reward needs from each dataset row's ground truth."""
    checks = []
    for name, args in leaf_rewards(reward_spec.name, dict(reward_spec.args or {})):
        check = ANSWER_CHECKS.get(name)
        if check is None:
            continue
        wanted = inspect.signature(check).parameters
        extra = {k: v for k, v in args.items() if k in wanted and k != "value"}
        checks.append((check, extra))

    def check(value: Any) -> str | None:
        for fn, extra in checks:
            problem = fn(value, **extra)
            if problem is not None:
                return problem
        return None

    return check


def leaf_rewards(name: str, args: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The (name, args) of the rewards a spec runs: combined's components, else itself."""
    if name != "combined":
        return [(name, dict(args))]
    return [(n, a) for n, _, a in _components(args)]


def check_reward_args(name: str, args: Mapping[str, Any]) -> None:
    """Fail early (ValueError) on an unknown reward, argument names the reward does not take
    (listing those it does), or argument values it rejects (a dry run on empty text: the
    rules are total on any text, so only bad arguments can make it fail)."""
    _check_arg_names(name, args)
    if name in MODEL_REWARDS:
        return
    if any(leaf not in REWARDS for leaf, _ in leaf_rewards(name, args)):
        return  # an installed reward need not be total on empty text: names only
    try:
        get_reward(name)("", "", {}, **args)
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"reward '{name}': bad args: {exc}") from None


def _check_arg_names(name: str, args: Mapping[str, Any]) -> None:
    fn = get_reward(name)
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        if name == "combined":
            for comp, _, comp_args in _components(args):
                if comp == "combined":
                    raise ValueError("combined: a component cannot itself be 'combined'")
                if comp in MODEL_REWARDS:
                    raise ValueError(f"combined: '{comp}' runs in its own stage and cannot "
                                     "be a component; use it as the reward name")
                _check_arg_names(comp, comp_args)
        return
    accepted = [p for p in params if p not in ("prompt", "response", "meta")]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ValueError(
            f"reward '{name}' got unknown args: {', '.join(unknown)}; "
            f"accepts: {', '.join(accepted) or '(none)'}"
        )


def compute_rewards(
    reward_spec: RewardSpecLike,
    prompts: Sequence[str],
    responses: Sequence[str],
    metas: Sequence[Mapping[str, Any] | None] | None = None,
) -> list[float]:
    """One float per (prompt, response, meta); metas default to {} (e.g. no answers)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if metas is not None and len(metas) != len(responses):
        raise ValueError(f"{len(metas)} metas but {len(responses)} responses")
    args = dict(reward_spec.args or {})
    check_reward_args(reward_spec.name, args)
    fn = get_reward(reward_spec.name)
    metas = metas if metas is not None else [None] * len(responses)

    def score(item: tuple[str, str, Mapping[str, Any] | None]) -> float:
        prompt, response, meta = item
        return float(fn(prompt, response, dict(meta or {}), **args))

    items = list(zip(prompts, responses, metas, strict=True))
    concurrent = any(n in CONCURRENT for n, _ in leaf_rewards(reward_spec.name, args))
    workers = min(len(items), _workers(reward_spec)) if concurrent else 1
    if workers <= 1:
        return [score(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward") as pool:
        return list(pool.map(score, items))


def _workers(reward_spec: RewardSpecLike) -> int:
    configured = getattr(reward_spec, "workers", None)
    return int(configured) if configured else max(1, len(os.sched_getaffinity(0)))
