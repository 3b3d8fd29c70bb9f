"""From rollout samples to the scoring requests and the trainer's batch (advantages).

GRPO: one scalar reward per response, normalised within its group, broadcast over tokens.
PPO: the reward sits on the last token and GAE against the critic's values gives advantages
and returns. In both the KL to the reference is a loss term in the trainer (β·KL).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhfless.api.spec import JobSpec
from rlhfless.api.wire import (
    RewardItem,
    RewardRequest,
    RolloutSample,
    ScoreRequest,
    TrainRequest,
)
from rlhfless.driver.rollout import PromptItem
from rlhfless.model.tokenizer import Tokenizer
from rlhfless.train.batch import make_train_batch

Groups = list[list[list[int]]]
PerToken = list[list[list[float]]]


def _groups(items: list[PromptItem], samples: dict[str, list[RolloutSample]]) -> Groups:
    return [[s.response for s in samples[item.key]] for item in items]


def score_payloads(
    spec: JobSpec,
    items: list[PromptItem],
    samples: dict[str, list[RolloutSample]],
    version: int,
    prefix: str,
    tokenizer: Tokenizer,
) -> dict[str, dict[str, Any]]:
    prompts = [item.prompt_ids for item in items]
    groups = _groups(items, samples)
    dedup = spec.scheduling.dedup_prefill
    payloads: dict[str, dict[str, Any]] = {}
    if spec.stages.has("reference"):
        # The reference policy is the initial weights, version 0, for the whole job.
        payloads["reference"] = ScoreRequest(
            request_id=f"{prefix}-ref", weights_version=0, prompts=prompts, groups=groups,
            dedup_prefill=dedup,
        ).model_dump(mode="json")
    payloads["reward"] = RewardRequest(
        request_id=f"{prefix}-reward",
        items=[
            RewardItem(prompt=item.text, response=tokenizer.decode(s.response), meta=item.meta)
            for item in items for s in samples[item.key]
        ],
    ).model_dump(mode="json")
    if spec.stages.has("critic"):
        payloads["critic"] = ScoreRequest(
            request_id=f"{prefix}-critic", weights_version=version, prompts=prompts,
            groups=groups, dedup_prefill=dedup,
        ).model_dump(mode="json")
    return payloads


def _ragged(per_token: PerToken) -> list[list[torch.Tensor]]:
    return [[torch.tensor(r, dtype=torch.float32) for r in group] for group in per_token]


def build_train_request(
    spec: JobSpec,
    items: list[PromptItem],
    samples: dict[str, list[RolloutSample]],
    scores: dict[str, dict[str, Any]],
    version: int,
    request_id: str,
    new_version: int | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The trainer's request (advantages computed here) and reward/length statistics;
    `new_version` is the version the trainer publishes (default version + 1)."""
    groups = _groups(items, samples)
    flat = scores["reward"]["rewards"]
    rewards, k = [], 0
    for group in groups:
        rewards.append(flat[k : k + len(group)])
        k += len(group)
    ref = scores.get("reference", {}).get("values")
    values = scores.get("critic", {}).get("values")
    batch = make_train_batch(
        spec.algorithm, [item.prompt_ids for item in items], groups, rewards,
        ref_logprobs=_ragged(ref) if ref is not None else None,
        values=_ragged(values) if values is not None else None,
    )
    r = torch.tensor(flat, dtype=torch.float32)
    lengths = torch.tensor([len(resp) for group in groups for resp in group], dtype=torch.float32)
    stats = {
        "reward/mean": r.mean().item(),
        "reward/std": r.std().item() if len(r) > 1 else 0.0,
        "reward/max": r.max().item(),
        "response_length/mean": lengths.mean().item(),
        "response_length/max": lengths.max().item(),
    }
    request = TrainRequest(request_id=request_id, weights_version=version,
                           new_version=new_version, **batch.to_lists())
    return request.model_dump(mode="json"), stats
