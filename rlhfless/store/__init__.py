"""The job's store: weight versions (optimizer state included), rollout shards, the driver's
checkpoint.

One module per kind of record, all written through `store.atomic` (temp + rename). The store
is append-only (a version is never rewritten) and holds only safetensors, msgpack and JSON:
nothing in it is ever unpickled.
"""

from rlhfless.store.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    Recovery,
    load_checkpoint,
    prune_history,
    recover,
    save_checkpoint,
)
from rlhfless.store.optimizer import OPTIMIZER_PART, load_optimizer_state, optimizer_part
from rlhfless.store.shards import ShardError, ShardStore
from rlhfless.store.weights import (
    DEFAULT_PART,
    MANIFEST,
    VersionExistsError,
    WeightStore,
    WeightStoreError,
    sha256_file,
)

__all__ = [
    "CHECKPOINT_FILE",
    "DEFAULT_PART",
    "MANIFEST",
    "OPTIMIZER_PART",
    "ShardError",
    "ShardStore",
    "Checkpoint",
    "CheckpointError",
    "Recovery",
    "VersionExistsError",
    "WeightStore",
    "WeightStoreError",
    "load_checkpoint",
    "load_optimizer_state",
    "optimizer_part",
    "prune_history",
    "recover",
    "save_checkpoint",
    "sha256_file",
]
