"""Rule-based rewards (registry keyed by name) and the prompt datasets they score."""

from rlhfless.rewards.arithmetic import generate_problems
from rlhfless.rewards.datasets import (
    DatasetError,
    batch_for_step,
    load_dataset,
    load_jsonl,
    repeat_prompts,
)
from rlhfless.rewards.registry import (
    REWARDS,
    RewardFn,
    check_reward_args,
    combined,
    compute_rewards,
    get_reward,
)
from rlhfless.rewards.rules import extract_answer, parse_number

__all__ = [
    "REWARDS",
    "DatasetError",
    "RewardFn",
    "batch_for_step",
    "check_reward_args",
    "combined",
    "compute_rewards",
    "extract_answer",
    "generate_problems",
    "get_reward",
    "load_dataset",
    "load_jsonl",
    "parse_number",
    "repeat_prompts",
]
