"""A model whose logits are NaN for inputs whose first pixel is bright, to test that path.

Built by Ray actors from ``--model tests.nan_model:factory``.
"""

from __future__ import annotations

import torch
from torch import nn

# Normalized value above which the first pixel (channel 0, row 0, column 0) counts as bright.
THRESHOLD = 0.5


class NanWhenBright(nn.Module):
    """A linear classifier on 3 x 16 x 16 inputs whose output is NaN for bright-corner inputs.

    The NaN multiplies the logits, so the input gradient of those examples is NaN as well.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 16 * 16, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.linear(images.flatten(1))
        bright = images[:, 0, 0, 0] > THRESHOLD
        scale = torch.where(bright, torch.full_like(logits[:, 0], float("nan")),
                            torch.ones_like(logits[:, 0]))
        return logits * scale[:, None]


def factory(num_classes: int = 10) -> nn.Module:
    return NanWhenBright(num_classes)
