"""Grad-CAM heatmaps leave the model as they found it; example selection and tables are deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxr.evaluation.saliency import gradcam_heatmaps, misclassified, overlay, select_examples
from cxr.lung_box import center_box
from cxr.reporting.saliency_gallery import gallery
from cxr.training.models import IMAGENET_MEAN, IMAGENET_STD, build_model

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]


def _tiny_cnn():
    """The custom CNN downsamples 32x, so 64 px images give a 2x2 map (1x1 could not localise anything)."""
    torch.manual_seed(0)
    return build_model("custom_cnn", 3, [0.5], [0.25], width=8)


def _images(count: int, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 1, height, width, generator=torch.Generator().manual_seed(seed))


def _flags(model: torch.nn.Module) -> list[bool]:
    return [param.requires_grad for param in model.parameters()]


def _modes(model: torch.nn.Module) -> list[bool]:
    return [module.training for module in model.modules()]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def _check_heatmaps(heatmaps: np.ndarray, count: int, height: int, width: int) -> None:
    assert heatmaps.shape == (count, height, width)
    assert heatmaps.dtype == np.float32
    assert np.isfinite(heatmaps).all()
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert (heatmaps.reshape(count, -1).max(axis=1) > 0).any(), "every heatmap is blank"


def _predictions(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    """A predictions table from (path, label, predicted, probability of the predicted class)."""
    records = []
    for path, label, predicted, confidence in rows:
        rest = (1.0 - confidence) / 2
        record = {"path": path, "label": label, "predicted": predicted}
        record.update({f"prob_{name}": confidence if name == predicted else rest for name in CLASSES})
        records.append(record)
    return pd.DataFrame(records)


@pytest.fixture
def predictions() -> pd.DataFrame:
    rows = [
        ("c/1.png", "COVID19", "COVID19", 0.9),
        ("c/2.png", "COVID19", "COVID19", 0.7),
        ("c/0.png", "COVID19", "COVID19", 0.7),
        ("c/3.png", "COVID19", "NORMAL", 0.6),
        ("n/1.png", "NORMAL", "NORMAL", 0.8),
        ("n/2.png", "NORMAL", "PNEUMONIA", 0.5),
        ("n/3.png", "NORMAL", "COVID19", 0.95),
        ("n/4.png", "NORMAL", "PNEUMONIA", 0.4),
        ("p/1.png", "PNEUMONIA", "PNEUMONIA", 0.99),
    ]
    frame = _predictions(rows)
    frame.index = frame.index + 100  # a non-default index must survive selection
    return frame


def test_heatmaps_have_image_size_and_range_and_model_is_restored():
    model = _tiny_cnn().train()
    head = model.head[-1]
    head.weight.grad = torch.ones_like(head.weight)
    model.body[0].requires_grad_(False)
    flags, modes, state = _flags(model), _modes(model), _state(model)

    heatmaps = gradcam_heatmaps(model, _images(5, 64, 96), batch_size=2)

    _check_heatmaps(heatmaps, 5, 64, 96)
    assert _flags(model) == flags
    assert _modes(model) == modes and model.training
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert torch.equal(head.weight.grad, torch.ones_like(head.weight))
    assert all(param.grad is None for name, param in model.named_parameters() if not name.startswith("head"))


def test_heatmaps_explain_the_predicted_class_unless_told_otherwise():
    model = _tiny_cnn().eval()
    images = _images(4, seed=1)
    with torch.no_grad():
        predicted = model(images).argmax(1).tolist()
    other = [(p + 1) % 3 for p in predicted]

    assert np.allclose(gradcam_heatmaps(model, images), gradcam_heatmaps(model, images, predicted))
    chosen = gradcam_heatmaps(model, images, other)
    _check_heatmaps(chosen, 4, 64, 64)
    assert not np.allclose(chosen, gradcam_heatmaps(model, images))
    assert not model.training


def test_heatmaps_do_not_depend_on_batch_size():
    model = _tiny_cnn()
    images = _images(5, seed=2)
    assert np.allclose(gradcam_heatmaps(model, images, batch_size=1), gradcam_heatmaps(model, images, batch_size=16))


def test_heatmaps_work_for_frozen_resnet_body():
    torch.manual_seed(0)
    model = build_model("resnet18", 3, IMAGENET_MEAN, IMAGENET_STD)
    model.freeze_body()
    model.train()
    flags, modes = _flags(model), _modes(model)

    heatmaps = gradcam_heatmaps(model, _images(2, 64, 64), target_classes=[0, 2])

    _check_heatmaps(heatmaps, 2, 64, 64)
    assert _flags(model) == flags and not any(p.requires_grad for p in model.body.parameters())
    assert _modes(model) == modes and model.head.training and not model.body.training


def test_heatmaps_work_under_no_grad_and_for_empty_input():
    model = _tiny_cnn()
    with torch.no_grad():
        _check_heatmaps(gradcam_heatmaps(model, _images(2)), 2, 64, 64)
    assert gradcam_heatmaps(model, torch.zeros(0, 1, 32, 32)).shape == (0, 32, 32)


@pytest.mark.parametrize(
    ("images", "targets"),
    [
        (torch.zeros(2, 3, 32, 32), None),
        (torch.zeros(2, 32, 32), None),
        (torch.zeros(2, 1, 32, 32), [0]),
        (torch.zeros(2, 1, 32, 32), [0, 3]),
        (torch.zeros(2, 1, 32, 32), [-1, 0]),
    ],
)
def test_heatmaps_reject_bad_arguments(images, targets):
    with pytest.raises(ValueError):
        gradcam_heatmaps(_tiny_cnn(), images, targets)


def test_overlay_is_rgb_uint8_of_image_size():
    image = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (20, 1))
    heatmap = np.linspace(0, 1, image.size, dtype=np.float32).reshape(image.shape)

    result = overlay(image, heatmap)

    assert result.shape == (20, 32, 3) and result.dtype == np.uint8
    assert not np.array_equal(result[..., 0], result[..., 2]), "no colour was added"
    assert np.array_equal(overlay(image, np.zeros_like(heatmap), alpha=0.0)[..., 0], overlay(image, heatmap, alpha=0.0)[..., 0])


@pytest.mark.parametrize(
    ("image", "heatmap", "alpha"),
    [
        (np.zeros((8, 8), np.float32), np.zeros((8, 8)), 0.4),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 9)), 0.4),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8)), 1.5),
    ],
)
def test_overlay_rejects_bad_arguments(image, heatmap, alpha):
    with pytest.raises(ValueError):
        overlay(image, heatmap, alpha)


def test_select_examples_orders_and_limits_per_class_and_outcome(predictions):
    chosen = select_examples(predictions, CLASSES, per_class=2)

    assert list(chosen["path"]) == ["c/1.png", "c/0.png", "c/3.png", "n/1.png", "n/3.png", "n/2.png", "p/1.png"]
    assert list(chosen["outcome"]) == ["correct", "correct", "wrong", "correct", "wrong", "wrong", "correct"]
    assert (chosen["outcome"] == np.where(chosen["label"] == chosen["predicted"], "correct", "wrong")).all()
    assert chosen.groupby(["label", "outcome"]).size().max() <= 2
    assert list(chosen.index) == [100, 102, 103, 104, 106, 105, 108]
    assert np.allclose(chosen["confidence"], [0.9, 0.7, 0.6, 0.8, 0.95, 0.5, 0.99])


def test_select_examples_is_deterministic_under_row_order(predictions):
    shuffled = predictions.sample(frac=1.0, random_state=3)
    first = select_examples(predictions, CLASSES, per_class=1)
    assert first.equals(select_examples(shuffled, CLASSES, per_class=1))
    assert len(first) == 5
    assert select_examples(predictions, CLASSES, per_class=0).empty


def test_select_examples_reports_missing_columns(predictions):
    from cxr.errors import PipelineError

    with pytest.raises(PipelineError, match="prob_NORMAL"):
        select_examples(predictions.drop(columns="prob_NORMAL"), CLASSES, per_class=1)


def test_gallery_writes_a_png(tmp_path: Path, predictions):
    examples = select_examples(predictions, CLASSES, per_class=2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(examples), 32, 32), dtype=np.uint8)
    heatmaps = rng.random((len(examples), 32, 32), dtype=np.float32)
    target = tmp_path / "figures" / "custom_cnn.png"

    gallery(images, heatmaps, examples, CLASSES, "custom_cnn", target)

    with Image.open(target) as picture:
        assert picture.format == "PNG"
        width, height = picture.size
    assert width > height > 0  # 3 rows of 4 tiles
    with pytest.raises(ValueError):
        gallery(images[:-1], heatmaps, examples, CLASSES, "custom_cnn", tmp_path / "bad.png")


def test_misclassified_lists_every_mistake_most_confident_first(predictions):
    table = misclassified(predictions, CLASSES)

    assert list(table.columns) == ["path", "label", "predicted", "confidence"]
    assert list(table["path"]) == ["n/3.png", "c/3.png", "n/2.png", "n/4.png"]
    assert np.allclose(table["confidence"], [0.95, 0.6, 0.5, 0.4])
    assert misclassified(predictions[predictions["label"] == predictions["predicted"]], CLASSES).empty


def test_gradcam_gallery_explains_the_class_the_table_predicted(tmp_path: Path, predictions, monkeypatch):
    import cxr.reporting.saliency_gallery as saliency_gallery

    explained = {}

    def fake_heatmaps(model, pixels, target_classes=None):
        explained["targets"] = target_classes
        return np.zeros((len(pixels), *pixels.shape[2:]), dtype=np.float32)

    monkeypatch.setattr(saliency_gallery, "gradcam_heatmaps", fake_heatmaps)
    images = np.zeros((predictions.index.max() + 1, 32, 32), dtype=np.uint8)

    saliency_gallery.gradcam_gallery(_tiny_cnn(), images, predictions, CLASSES, 2, "custom", tmp_path / "g.png")

    chosen = select_examples(predictions, CLASSES, per_class=2)
    assert explained["targets"] == [CLASSES.index(name) for name in chosen["predicted"]]
    assert (tmp_path / "g.png").exists()


@pytest.mark.parametrize("lung_box", [0.5, 0.7])
def test_a_crop_models_map_lies_on_its_box_of_the_film_and_is_zero_around_it(lung_box):
    crop = build_model("custom_cnn", 3, [0.5], [0.25], width=8, lung_box=lung_box, crop=True).eval()
    keep = _tiny_cnn().eval()
    keep.load_state_dict(crop.state_dict())
    images = _images(3, seed=4)
    rows, cols = center_box(64, lung_box)
    side = rows.stop - rows.start
    enlarged = torch.nn.functional.interpolate(images[..., rows, cols], size=(64, 64), mode="bilinear",
                                               align_corners=False)
    seen = gradcam_heatmaps(keep, enlarged)  # what the cropping model looks at, over its own input
    expected = np.zeros((3, 64, 64), dtype=np.float32)
    for index, heatmap in enumerate(seen):
        expected[index, rows, cols] = np.asarray(
            Image.fromarray(heatmap, mode="F").resize((side, side), Image.Resampling.BILINEAR))

    heatmaps = gradcam_heatmaps(crop, images)

    _check_heatmaps(heatmaps, 3, 64, 64)
    np.testing.assert_allclose(heatmaps, expected, rtol=0, atol=1e-4)
    outside = np.ones((64, 64), dtype=bool)
    outside[rows, cols] = False
    assert not heatmaps[:, outside].any()  # the gallery's overlay draws these maps: no heat on the film around the box
