"""What a rollout engine must do for the actor function."""

from __future__ import annotations

from typing import Protocol

from rlhfless.api.wire import ActorRequest, ActorResponse


class RolloutEngine(Protocol):
    """Generates GRPO groups for one actor request on the requested weights version.

    Contract (both engines, tested on the transformers one):
    - every (prompt key, sample index) asked for comes back exactly once;
    - `prefixes` continue a cut sample: the returned `response` is the whole response
      (prefix + continuation) and `logprobs` covers every token of it;
    - a sample's random stream depends only on (seed, key, sample index, position), so a cut
      and continued sample equals the uncut one;
    - with `cut_fraction`, the engine returns once that fraction of samples has finished,
      unfinished samples carrying their partial responses (`finished=False`).
    """

    def rollout(self, request: ActorRequest) -> ActorResponse: ...

    def loaded_version(self) -> int | None: ...
