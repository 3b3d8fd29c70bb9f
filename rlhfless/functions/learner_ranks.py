"""A learner instance with N > 1 ranks (`resources.learner.gpus: N`): rank 0 serves HTTP.

The instance is one process to its runtime, as every instance is; that process is rank 0.
It starts N − 1 followers (rlhfless.train.ranks.RankGroup: same interpreter, one GPU each,
NCCL on GPUs, gloo on the CPU), and every rank builds the same LearnerHandler over the
same store, with its `Ranks`. Each validated request is relayed to every rank as JSON and
handled there in the same order; rank 0's reply is the instance's reply. A refusal (404,
409) is decided before any collective and alike on every rank, so the ranks stay in step;
anything else ends the instance (the runtime starts a fresh one, the driver begins the step
again on it).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, TypeAdapter

from rlhfless.api.spec import RLHFJob, parse_job
from rlhfless.api.wire import LearnerRequest
from rlhfless.functions.app import FunctionError
from rlhfless.functions.learner import LearnerHandler
from rlhfless.store import WeightStore
from rlhfless.train.distributed import Ranks
from rlhfless.train.ranks import RankGroup

FACTORY = "rlhfless.functions.learner_ranks:RankLearner"
_REQUEST = TypeAdapter(LearnerRequest)


class RankLearner:
    """What every rank runs: a LearnerHandler over the rank's shards."""

    request_errors = (FunctionError,)

    def __init__(self, config: dict[str, Any], ranks: Ranks) -> None:
        job = parse_job(config["job"], "learner ranks")
        self.handler = LearnerHandler(WeightStore(config["store"]), job.spec, ranks=ranks)

    def warm(self, latest: int) -> None:
        self.handler.warm(latest)

    def handle(self, request: dict[str, Any]) -> BaseModel:
        return self.handler.handle(_REQUEST.validate_python(request))


class RankedLearnerHandler:
    """The instance's handler (rank 0): relays every request to all ranks."""

    stage = "learner"

    def __init__(self, store: WeightStore, job: RLHFJob, world: int, *,
                 device_type: str | None = None, on_failure: Any = None) -> None:
        config = {"store": str(store.root),
                  "job": job.model_dump(mode="json", by_alias=True, exclude_none=True)}
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        # On the CPU the ranks share the process's cores; on GPUs torch's default is fine.
        threads = max(1, torch.get_num_threads() // world) if device_type == "cpu" else 0
        if threads:
            torch.set_num_threads(threads)
        self.group = RankGroup.start(world, FACTORY, config, device_type=device_type,
                                     on_failure=on_failure, threads=threads)

    @property
    def _rank0(self) -> LearnerHandler:
        return self.group.target.handler

    def loaded_version(self) -> int | None:
        return self._rank0.cache.version

    def warm(self, latest: int) -> None:
        self.group.call("warm", latest)

    def handle(self, request: BaseModel) -> BaseModel:
        return self.group.call("handle", request.model_dump(mode="json"))

    def close(self) -> None:
        self.group.close()
