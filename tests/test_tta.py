"""Test-time augmentation: the averaged probabilities are those of the views, and the views are the named warps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxr.evaluation.tta import VIEWS, ViewAveraged, view
from cxr.training.models import build_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(arch="custom_cnn", num_classes=3, mean=[0.5], std=[0.25], width=8).eval()
    with torch.no_grad():
        model.head[1].weight.mul_(20.0)
    return model


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(1))


def test_the_first_view_is_the_image_itself():
    x = _images()
    assert VIEWS[0] == (0.0, 1.0)
    assert view(x, *VIEWS[0]) is x


def test_one_identity_view_gives_the_model_own_probabilities():
    model, x = _model(), _images()
    with torch.inference_mode():
        expected = model(x).softmax(1)
        got = ViewAveraged(model, views=((0.0, 1.0),))(x)
    torch.testing.assert_close(got.softmax(1), expected)
    torch.testing.assert_close(got.exp(), expected)


def test_output_is_the_log_of_the_mean_of_each_views_probabilities():
    model, x = _model(), _images()
    with torch.inference_mode():
        got = ViewAveraged(model)(x)
        per_view = torch.stack([model(view(x, *v)).softmax(1) for v in VIEWS])
    torch.testing.assert_close(got.exp(), per_view.mean(0))
    torch.testing.assert_close(got.exp().sum(1), torch.ones(len(x)))
    assert not torch.allclose(per_view[0], per_view[1]), "the rotated view should change the prediction"


def test_zoom_above_one_magnifies_the_centre():
    ramp = torch.linspace(0, 1, 33).expand(1, 1, 33, 33).contiguous()
    zoomed = view(ramp, 0.0, 2.0)
    centre = ramp[0, 0, 16]
    torch.testing.assert_close(zoomed[0, 0, 16, 16], centre[16])
    assert zoomed[0, 0, 16].min() > 0.2 and zoomed[0, 0, 16].max() < 0.8


def test_rotation_moves_an_off_centre_spot_and_keeps_the_centre():
    x = torch.zeros(1, 1, 31, 31)
    x[0, 0, 15, 15], x[0, 0, 15, 27] = 1.0, 1.0
    rotated = view(x, 90.0, 1.0)
    assert rotated[0, 0, 15, 15] > 0.9
    assert rotated[0, 0, 15, 27] < 0.1


def test_a_certain_model_gives_finite_log_probabilities():
    class Certain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[200.0, -200.0, 0.0]]).expand(len(x), 3)

    out = ViewAveraged(Certain())(_images())
    assert torch.isfinite(out).all()
    assert (out.argmax(1) == 0).all()


def test_views_must_not_be_empty():
    with pytest.raises(ValueError, match="at least one view"):
        ViewAveraged(_model(), views=())
