"""User rewards installed as Python entry points (group `rlhfless.rewards`).

A package built into the function image declares, in its pyproject.toml,

    [project.entry-points."rlhfless.rewards"]
    my_reward = "my_package.rewards:my_reward"

and a job selects it with `reward: {name: my_reward}`. Only installed distributions are
consulted, so a job file can choose among what the image offers but never make the reward
function import a module of its choosing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

GROUP = "rlhfless.rewards"
log = logging.getLogger("rlhfless.rewards")


class PluginError(ValueError):
    """An installed reward entry point that cannot be loaded or is not callable."""


@functools.cache
def plugin_entry_points() -> dict[str, Any]:
    """Name → entry point of every installed reward (listed once per process, not loaded)."""
    found: dict[str, Any] = {}
    for ep in entry_points(group=GROUP):
        if ep.name in found:
            log.warning("reward entry point %r is installed twice; using %s", ep.name,
                        found[ep.name].value)
            continue
        found[ep.name] = ep
    return found


@functools.cache
def load_plugin(name: str) -> Callable[..., float]:
    """The installed reward `name` (KeyError when none is installed under that name)."""
    ep = plugin_entry_points()[name]
    try:
        fn = ep.load()
    except Exception as exc:  # noqa: BLE001 - any import failure is the package's: name it
        raise PluginError(f"reward entry point '{ep.name}' ({ep.value}) failed to load: "
                          f"{type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise PluginError(f"reward entry point '{ep.name}' ({ep.value}) is not callable")
    return fn
