"""The trainer's optimizer state as a part of the weights version it produced.

A trainer instance may scale to zero between steps, so the state after producing version n
is published inside v{n}/ as `optimizer.safetensors`: its tensors by path, and the rest of
the state (numbers, flags, dict keys, list shapes) as JSON in the file's safetensors header.
The file is in the version's manifest, so its sha256 is checked like the weights, and it is
written and pruned with the version. Loading never unpickles: a state that cannot be
expressed as tensors + JSON is refused when it is saved.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from rlhfless.store.weights import WeightStore, WeightStoreError

OPTIMIZER_PART = "optimizer"
TREE_KEY = "rlhfless.tree"  # safetensors header key holding the JSON skeleton
_TENSOR, _DICT, _TUPLE = "__tensor__", "__dict__", "__tuple__"


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors by path, JSON skeleton) of a nested optimizer state. Dicts keep their key
    types (torch uses int parameter ids), tuples stay tuples; anything else is a TypeError
    naming where it sits."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to("cpu").contiguous()
            return {_TENSOR: path}
        if isinstance(value, Mapping):
            items = []
            for key, item in value.items():
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise TypeError(f"optimizer state key {key!r} at {path or '(root)'} is "
                                    "neither str nor int")
                items.append([key, walk(item, f"{path}.{key}" if path else str(key))])
            return {_DICT: items}
        if isinstance(value, (list, tuple)):
            items = [walk(item, f"{path}[{i}]") for i, item in enumerate(value)]
            return {_TUPLE: items} if isinstance(value, tuple) else items
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"optimizer state value of type {type(value).__name__} at "
                        f"{path or '(root)'} cannot be stored without pickling")

    tree = walk(state, "")
    return tensors, json.dumps(tree, separators=(",", ":"))


def unflatten_state(tensors: Mapping[str, torch.Tensor], tree_json: str) -> Any:
    """Inverse of `flatten_state`."""
    def build(node: Any) -> Any:
        if isinstance(node, list):
            return [build(item) for item in node]
        if isinstance(node, dict):
            if _TENSOR in node:
                return tensors[node[_TENSOR]]
            if _TUPLE in node:
                return tuple(build(item) for item in node[_TUPLE])
            if _DICT in node:
                return {key: build(item) for key, item in node[_DICT]}
            raise ValueError(f"unknown node in optimizer state skeleton: {sorted(node)}")
        return node

    return build(json.loads(tree_json))


def optimizer_part(state: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors header) to publish as the version's "optimizer" part."""
    tensors, tree = flatten_state(state)
    return tensors, {TREE_KEY: tree}


def load_optimizer_state(store: WeightStore, version: int) -> Any | None:
    """The optimizer state published with `version` (sha256-verified), or None if that
    version has none (version 0, the base model)."""
    if OPTIMIZER_PART not in store.parts(version):
        return None
    tensors, _ = store.load(version, OPTIMIZER_PART)
    header = store.header(version, OPTIMIZER_PART)
    if TREE_KEY not in header:
        raise WeightStoreError(f"version {version}: optimizer part has no {TREE_KEY} header")
    try:
        return unflatten_state(tensors, header[TREE_KEY])
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightStoreError(f"version {version}: unreadable optimizer state: {exc}") from exc
