"""Critic for PPO: an LM backbone with a linear value head on its last hidden states."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rlhfless.model.logprobs import grouped_forward


class ValueModel(nn.Module):
    """V(state before each response token), computed with the shared-prefix forward.

    `backbone` is a causal LM (usually a copy of the base policy); only its transformer body
    is used. The value of response token t reads the hidden state that predicts token t,
    i.e. the same positions the policy log-probs use (verl's `values[:, -R-1:-1]`).
    The head starts small and seeded so a fresh critic predicts ~0 and is reproducible.
    """

    def __init__(self, backbone: nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, hidden, generator=gen) / (hidden + 1) ** 0.5)
            self.head.bias.zero_()
        anchor = next(backbone.parameters())
        self.head.to(device=anchor.device, dtype=anchor.dtype)

    def grouped_values(
        self, prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[Sequence[int]]]
    ) -> list[list[torch.Tensor]]:
        """`result[i][j]`: values [len(groups[i][j])] of response j of prompt i."""
        out = grouped_forward(self.backbone, prompts, groups, logprobs=False, hidden=True)
        assert out.hidden is not None
        return [[self.head(h).squeeze(-1) for h in grp] for grp in out.hidden]

    def values(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Flat form: one prompt per response. Runs of the same prompt share its prefill."""
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses must have the same length")
        uniq: list[list[int]] = []
        groups: list[list[list[int]]] = []
        for prompt, response in zip(prompts, responses, strict=True):
            if not uniq or uniq[-1] != list(prompt):
                uniq.append(list(prompt))
                groups.append([])
            groups[-1].append(list(response))
        return [v for grp in self.grouped_values(uniq, groups) for v in grp]

    def forward(
        self, prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[Sequence[int]]]
    ) -> list[list[torch.Tensor]]:
        return self.grouped_values(prompts, groups)
