"""Rollout shards: each finished group of a step, in the binary codec, in the job's store.

    shards/s{step}/{name}.msgpack

The driver writes one shard per scored group as it arrives; a learner request larger than
the inline threshold names the shard instead of carrying it, and a learner that restarted
mid-step gets the step's groups again from here. Shards are written atomically (a reader
sees a whole shard or none) and pruned with the steps they belong to.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from rlhfless.api import codec
from rlhfless.store.atomic import atomic_file

SHARDS_DIR = "shards"
_SHARD_ID = re.compile(r"^s(\d+)/([A-Za-z0-9_.-]{1,128})$")
_STEP_DIR = re.compile(r"^s(\d+)$")


class ShardError(LookupError):
    """A shard id that is malformed or names no shard."""


class ShardStore:
    def __init__(self, store_root: str | Path) -> None:
        self.root = Path(store_root) / SHARDS_DIR

    @staticmethod
    def shard_id(step: int, name: str) -> str:
        shard = f"s{int(step)}/{name}"
        if not _SHARD_ID.match(shard):
            raise ShardError(f"bad shard name {name!r} (letters, digits, _ . - only)")
        return shard

    def path(self, shard: str) -> Path:
        # Ids come from requests: only the documented shape, never a path of their own.
        if not _SHARD_ID.match(shard):
            raise ShardError(f"malformed shard id {shard!r} (expected s<step>/<name>)")
        return self.root / f"{shard}.msgpack"

    def put(self, step: int, name: str, message: Any) -> str:
        """Write one message as shard `s{step}/{name}`; returns its id."""
        shard = self.shard_id(step, name)
        with atomic_file(self.path(shard)) as tmp:
            tmp.write_bytes(codec.encode(message))
        return shard

    def get(self, shard: str) -> Any:
        path = self.path(shard)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ShardError(f"no shard {shard!r} in {self.root}") from None
        return codec.decode(data)

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir()
                      if (m := _STEP_DIR.match(p.name)))

    def prune(self, keep_from_step: int) -> list[int]:
        """Delete the shards of steps before `keep_from_step`; returns the steps deleted."""
        gone = [s for s in self.steps() if s < keep_from_step]
        for step in gone:
            shutil.rmtree(self.root / f"s{step}", ignore_errors=True)
        return gone
