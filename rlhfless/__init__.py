"""RLHFless: serverless synchronous RLHF (GRPO/PPO) on Kubernetes and locally."""

__version__ = "0.1.0"
