"""Where a stage function's model runs: the GPU when the instance has one."""

from __future__ import annotations

import torch


def on_device(model: torch.nn.Module) -> torch.nn.Module:
    """Move a freshly loaded model to CUDA if available (the store always loads on CPU)."""
    return model.to("cuda") if torch.cuda.is_available() else model
