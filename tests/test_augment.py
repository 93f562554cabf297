"""Batched augmentation: the fast sampling grid, identity at zero strength, seeded and in range."""

import math

import pytest
import torch
import torch.nn.functional as F

from cxr.params import AugmentParams, TrainParams
from cxr.training.augment import affine_grid, augment_batch, random_affine, training_transform

NONE = AugmentParams(rotation_deg=0.0, scale=0.0, translate=0.0, brightness=0.0, contrast=0.0)


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40)])
def test_affine_grid_equals_torchs(height, width):
    generator = torch.Generator().manual_seed(0)
    angle = torch.rand(5, generator=generator) * math.pi
    theta = torch.stack([
        torch.stack([angle.cos(), -angle.sin(), torch.rand(5, generator=generator)], 1),
        torch.stack([angle.sin(), angle.cos(), torch.rand(5, generator=generator)], 1),
    ], 1) * 1.1
    expected = F.affine_grid(theta, [5, 1, height, width], align_corners=False)
    assert torch.allclose(affine_grid(theta, height, width), expected, atol=1e-6)


def test_zero_strength_leaves_images_unchanged():
    x = torch.rand(4, 1, 16, 16)
    assert torch.allclose(augment_batch(x, NONE, torch.Generator().manual_seed(0)), x, atol=1e-5)


def test_disabled_augmentation_is_the_identity():
    x = torch.rand(2, 1, 8, 8)
    assert augment_batch(x, AugmentParams(enabled=False), torch.Generator()) is x


def test_same_seed_same_augmentation_and_pixels_stay_in_range():
    x = torch.rand(6, 1, 20, 20)
    params = AugmentParams(rotation_deg=30, scale=0.3, translate=0.2, brightness=0.5, contrast=0.5)
    a, b, c = (augment_batch(x, params, torch.Generator().manual_seed(seed)) for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_each_image_gets_its_own_warp():
    x = torch.rand(1, 1, 20, 20).expand(8, 1, 20, 20).contiguous()
    warped = random_affine(x, AugmentParams(rotation_deg=20, scale=0.0, translate=0.0), torch.Generator().manual_seed(1))
    assert len({tuple(image.flatten()[:50].tolist()) for image in warped}) == 8


def test_training_transform_follows_the_recipe():
    x = torch.full((4, 1, 10, 10), 0.5)
    assert training_transform(TrainParams(augment=AugmentParams(enabled=False)), torch.Generator(), pixels=True) is None
    assert training_transform(TrainParams(), torch.Generator(), pixels=False) is None  # cached embeddings
    transform = training_transform(TrainParams(), torch.Generator().manual_seed(0), pixels=True)
    assert torch.equal(transform(x), augment_batch(x, TrainParams().augment, torch.Generator().manual_seed(0)))
