"""Test-time augmentation: a model's class probabilities averaged over a few fixed views of each image.

A single view's prediction depends on exactly how the film was framed; averaging over small
rotations and zooms, each inside the range the training augmentation drew from (rotation
±10°, zoom ±10%), removes part of that chance. Chosen on validation only: on cxr3 at 128 px,
:data:`VIEWS` raised the validation macro-F1 of each of six custom CNNs trained with
different recipes and seeds (+0.0018 to +0.0043, mean +0.0032) and lowered that of a
ResNet-18 trained from scratch (-0.0016), so ``evaluate.tta`` names the approaches that use
it. Flips are absent for the reason augmentation leaves them out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cxr.training.augment import warp

# (rotation in degrees, zoom); the first is the image as it is.
VIEWS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (5.0, 1.0), (-5.0, 1.0), (0.0, 1.05), (0.0, 0.95))


def view(x: torch.Tensor, rotation_deg: float, zoom: float) -> torch.Tensor:
    """The batch ``x`` (N x C x H x W) rotated and zoomed; the batch itself for the identity."""
    if rotation_deg == 0 and zoom == 1:
        return x
    n = x.shape[0]
    angle = torch.full((n,), math.radians(rotation_deg))
    return warp(x, angle, torch.full((n,), zoom), torch.zeros(n, 2))


class ViewAveraged(nn.Module):
    """``model`` scored on several views of each image; returns the log of the mean softmax.

    Log-probabilities are valid logits (their softmax is the averaged probabilities, and
    cross-entropy on them is the loss of the average), so evaluation, its loss and
    ``cxr-predict`` use the wrapped model like any other.
    """

    def __init__(self, model: nn.Module, views: tuple[tuple[float, float], ...] = VIEWS) -> None:
        super().__init__()
        if not views:
            raise ValueError("test-time augmentation needs at least one view")
        self.model, self.views = model, views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = sum(self.model(view(x, *v)).float().softmax(1) for v in self.views) / len(self.views)
        return probabilities.clamp_min(torch.finfo(torch.float32).tiny).log()
