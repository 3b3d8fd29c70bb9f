"""Activation (gradient) checkpointing: switch it on, and tell whether it is active.

transformers renamed the API during 5.x (`gradient_checkpointing_enable` /
`is_gradient_checkpointing` up to 5.20, `activation_checkpointing_enable` /
`is_activation_checkpointing` later), and a checkpointed layer drops the KV cache it is given
(in training mode; up to 5.20 even without grad). Both facts matter to the shared-prefix
pass, which feeds the prompt's cache to the response pass: under checkpointing it must fall
back to full sequences, or the responses silently attend to no prompt at all.

So detection does not rely on either property name: it reads the per-layer flag that every
5.x release sets (`module.gradient_checkpointing`).
"""

from __future__ import annotations

import torch


def enable_checkpointing(module: torch.nn.Module) -> None:
    """Recompute activations in backward (whichever name this transformers uses)."""
    enable = getattr(module, "activation_checkpointing_enable", None) or getattr(
        module, "gradient_checkpointing_enable", None
    )
    if enable is None:
        raise ValueError(f"{type(module).__name__} does not support gradient checkpointing")
    enable()
    # transformers only checkpoints in training mode; the tiny models and SmolLM2 have no
    # dropout, so train mode changes nothing else.
    module.train()


def checkpointing_active(model: torch.nn.Module) -> bool:
    """True when a forward of `model` may drop the KV cache it is given: training mode and
    at least one module flagged for checkpointing. Deliberately ignores the grad mode:
    transformers 5.20 drops the cache in training mode even under `torch.no_grad()`."""
    if not model.training:
        return False
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
