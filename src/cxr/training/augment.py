"""Batched augmentation on tensors: one affine warp and one intensity jitter per batch call.

Working on a whole ``(B, 1, H, W)`` batch with ``affine_grid``/``grid_sample`` costs a few
milliseconds, where per-image PIL transforms would dominate a CPU training step. Flips are
deliberately absent: a mirrored chest puts the heart on the wrong side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cxr.params import AugmentParams, TrainParams
from cxr.training.engine import BatchTransform


def _uniform(n: int, spread: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * 2 - 1) * spread


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, height, width), align_corners=False)``, by broadcasting.

    The same sampling grid (up to float rounding), built faster than torch does it: torch builds it
    with a batched matrix product over a homogeneous base grid, which cost more than the
    warp itself. Each row's offset is computed first, so the full-size grid is written once
    (one ``addcmul``) rather than through three full-size temporaries.
    """
    xs = (torch.arange(width, device=theta.device, dtype=theta.dtype) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=theta.device, dtype=theta.dtype) * 2 + 1) / height - 1
    t = theta.view(-1, 1, 1, 2, 3)
    rows = ys.view(1, height, 1, 1) * t[..., 1] + t[..., 2]
    return torch.addcmul(rows, xs.view(1, 1, width, 1), t[..., 0])


def warp(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image by ``angle`` (radians), zoom it in by ``scale`` and move it by ``shift``.

    One value per image (``shift``: N x 2, in units of half the image side). Border padding
    repeats the edge pixels where the warp uncovers the corners, rather than inventing black.
    """
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = affine_grid(theta.to(x.device, x.dtype), x.shape[-2], x.shape[-1])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_affine(x: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Rotate, scale and translate each image of the batch by its own random amount."""
    n = x.shape[0]
    angle = _uniform(n, math.radians(params.rotation_deg), generator)
    scale = 1 + _uniform(n, params.scale, generator)
    shift = _uniform(2 * n, 2 * params.translate, generator).view(n, 2)
    return warp(x, angle, scale, shift)


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


def training_transform(recipe: TrainParams, generator: torch.Generator, pixels: bool) -> BatchTransform | None:
    """What a training batch goes through before the model: the recipe's augmentation, if any.

    ``pixels`` is false when the batches are cached embeddings, which nothing can transform.
    """
    if not pixels or not recipe.augment.enabled:
        return None
    return lambda x: augment_batch(x, recipe.augment, generator)
