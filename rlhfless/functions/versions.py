"""Keep one weights version in memory and switch only when a request asks for another.

A function never serves a version it was not asked for: a request for a version the store
does not hold is refused with 404, naming the versions that exist.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from rlhfless.functions.app import FunctionError
from rlhfless.store import WeightStore, WeightStoreError

T = TypeVar("T")


class VersionedCache(Generic[T]):
    def __init__(self, store: WeightStore, load: Callable[[int], T]):
        self.store = store
        self._load = load
        self.version: int | None = None
        self.value: T | None = None

    def get(self, version: int) -> T:
        if version != self.version or self.value is None:
            if version not in self.store.versions():
                raise FunctionError(
                    404, f"unknown weights version {version}; store has {self.store.versions()}"
                )
            try:
                self.value = self._load(version)
            except WeightStoreError as exc:
                raise FunctionError(409, f"weights version {version} unreadable: {exc}") from None
            self.version = version
        return self.value
