"""The reward registry and the batch entry point the reward function calls."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from rlhfless.registry import lookup
from rlhfless.rewards.rules import exact_match, format_reward, length_penalty, target_char


class RewardFn(Protocol):
    def __call__(self, prompt: str, response: str, meta: dict[str, Any], **args: Any) -> float:
        ...


class RewardSpecLike(Protocol):
    name: str
    args: dict[str, Any]


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


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "format": format_reward,
    "length_penalty": length_penalty,
    "target_char": target_char,
    "combined": combined,
}


def get_reward(name: str) -> RewardFn:
    """The registered reward; an unknown name raises ValueError listing the known ones."""
    return lookup(REWARDS, name, "reward")


def check_reward_args(name: str, args: Mapping[str, Any]) -> None:
    """Fail early (ValueError) on an unknown reward, argument names the reward does not take
    (listing those it does), or argument values it rejects (a dry run on empty text: the
    rules are total on any text, so only bad arguments can make it fail)."""
    _check_arg_names(name, args)
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
    return [
        float(fn(p, r, dict(m or {}), **args))
        for p, r, m in zip(prompts, responses, metas, strict=True)
    ]
