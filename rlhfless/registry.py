"""One way to look a name up in a registry (advantages, losses, rewards, engines, …)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, what: str) -> T:
    """`table[name]`; an unknown name raises ValueError naming `what` and the known names."""
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table))
        raise ValueError(f"unknown {what} '{name}'; known: {known}") from None
