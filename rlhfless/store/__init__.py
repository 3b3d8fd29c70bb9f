"""The job's store: weight versions, optimizer state, rollout shards, the driver's checkpoint.

One module per kind of record, all written through `store.atomic` (temp + rename).
"""

from rlhfless.store.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from rlhfless.store.optimizer import (
    load_optimizer_state,
    prune_optimizer_states,
    save_optimizer_state,
)
from rlhfless.store.shards import ShardError, ShardStore
from rlhfless.store.weights import (
    DEFAULT_PART,
    MANIFEST,
    WeightStore,
    WeightStoreError,
    sha256_file,
)

__all__ = [
    "CHECKPOINT_FILE",
    "DEFAULT_PART",
    "MANIFEST",
    "ShardError",
    "ShardStore",
    "Checkpoint",
    "CheckpointError",
    "WeightStore",
    "WeightStoreError",
    "load_checkpoint",
    "load_optimizer_state",
    "prune_optimizer_states",
    "save_checkpoint",
    "save_optimizer_state",
    "sha256_file",
]
