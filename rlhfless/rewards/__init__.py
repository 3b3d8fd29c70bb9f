"""Rewards (registry keyed by name, plus installed entry points) and the prompt datasets
they score."""

from rlhfless.rewards.arithmetic import generate_problems
from rlhfless.rewards.datasets import (
    DatasetError,
    batch_for_step,
    chat_messages,
    load_dataset,
    load_jsonl,
    load_table,
    repeat_prompts,
    reward_meta,
)
from rlhfless.rewards.registry import (
    REWARDS,
    RewardFn,
    answer_check,
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
    "answer_check",
    "batch_for_step",
    "chat_messages",
    "check_reward_args",
    "combined",
    "compute_rewards",
    "extract_answer",
    "generate_problems",
    "get_reward",
    "load_dataset",
    "load_jsonl",
    "load_table",
    "parse_number",
    "repeat_prompts",
    "reward_meta",
]
