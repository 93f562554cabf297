"""Batched augmentation on tensors: one affine warp and one intensity jitter per batch call.

Working on a whole ``(B, 1, H, W)`` batch with ``affine_grid``/``grid_sample`` costs a few
milliseconds, where per-image PIL transforms would dominate a CPU training step. Flips are
deliberately absent: a mirrored chest puts the heart on the wrong side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cxr.params import AugmentParams


def _uniform(n: int, spread: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * 2 - 1) * spread


def random_affine(x: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Rotate, scale and translate each image of the batch by its own random amount."""
    n = x.shape[0]
    angle = _uniform(n, math.radians(params.rotation_deg), generator)
    scale = 1 + _uniform(n, params.scale, generator)
    shift = _uniform(2 * n, 2 * params.translate, generator).view(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_intensity(x: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Brightness and contrast jitter, as exposure differs between machines and hospitals."""
    n = x.shape[0]
    brightness = _uniform(n, params.brightness, generator).view(n, 1, 1, 1).to(x.device, x.dtype)
    contrast = (1 + _uniform(n, params.contrast, generator)).view(n, 1, 1, 1).to(x.device, x.dtype)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp_(0, 1)


def augment_batch(x: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Apply the enabled augmentations to a float batch in [0, 1]; identity when disabled."""
    if not params.enabled:
        return x
    return random_intensity(random_affine(x, params, generator), params, generator)
