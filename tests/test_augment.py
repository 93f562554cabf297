"""Batched augmentation: the fast sampling grid, identity at zero strength, seeded and in range; border erasing."""

import math

import pytest
import torch
import torch.nn.functional as F

from cxr.lung_box import center_box
from cxr.params import AugmentParams, TrainParams
from cxr.training.augment import affine_grid, augment_batch, erase_border, random_affine, training_transform

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


def test_border_erase_replaces_only_the_border_of_about_half_the_images():
    x = torch.full((200, 1, 20, 20), 0.5)
    erased = erase_border(x, 0.6, torch.Generator().manual_seed(0))
    rows, cols = center_box(20, 0.6)
    assert torch.equal(erased[..., rows, cols], x[..., rows, cols])
    changed = (erased != x).flatten(1).any(1)
    assert 70 < int(changed.sum()) < 130
    border = torch.ones(20, 20, dtype=torch.bool)
    border[rows, cols] = False
    assert (erased[changed][..., border] != 0.5).float().mean() > 0.99
    assert torch.equal(erased, erase_border(x, 0.6, torch.Generator().manual_seed(0)))


def test_training_transform_follows_the_recipe():
    recipe = TrainParams(augment=AugmentParams(enabled=False))
    assert training_transform(recipe, torch.Generator(), pixels=True) is None
    erasing = recipe.model_copy(update={"border": "erase"})
    assert training_transform(erasing, torch.Generator(), pixels=False) is None
    x = torch.full((64, 1, 10, 10), 0.5)
    assert not torch.equal(training_transform(erasing, torch.Generator().manual_seed(0), pixels=True)(x), x)
    hiding = recipe.model_copy(update={"border": "hide"})
    assert training_transform(hiding, torch.Generator(), pixels=True) is None  # the model itself hides it
