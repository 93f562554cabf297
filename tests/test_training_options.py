"""The option grid's scores (``benchmarks/training_options.py``) against scikit-learn and hand counts.

A stand-in model classifies each image by the mean brightness of its centred lung box, so what
it predicts intact and with the box hidden is known image by image; the script's overall,
worst-group and focus-collection figures must then equal scikit-learn's on those predictions.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score, roc_curve
from torch import nn

from cxr.lung_box import center_box

from test_train import tiny_params

ROOT = Path(__file__).resolve().parents[1]
SIZE, FRACTION = 20, 0.6


def _script():
    spec = importlib.util.spec_from_file_location("training_options", ROOT / "benchmarks" / "training_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BoxBrightness(nn.Module):
    """Logits that pick class 0, 1 or 2 as the box's mean pixel is below 85, below 170, or above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = center_box(x.shape[-1], FRACTION)
        level = x[:, 0, rows, cols].mean(dim=(1, 2))
        centres = torch.tensor([-1.0, 0.0, 1.0])  # the engine feeds normalised pixels: 0..255 -> about -1..1
        return -((level[:, None] - centres) ** 2) * 50 + torch.linspace(0, 1e-3, 3)


def _images(box_levels: list[int], border: int = 128) -> np.ndarray:
    images = np.full((len(box_levels), SIZE, SIZE), border, dtype=np.uint8)
    rows, cols = center_box(SIZE, FRACTION)
    for image, level in zip(images, box_levels):
        image[rows, cols] = level
    return images


@pytest.mark.parametrize("min_images", [2, 4])
def test_split_scores_match_sklearn_and_hand_counts(min_images, monkeypatch):
    module, scored = _script(), BoxBrightness()
    levels = [0, 0, 255, 128, 128, 255,  # collection a: predicted 0 0 2 1 1 2
              255, 128, 0]               # collection b: predicted 2 1 0
    labels = np.array([0, 0, 2, 1, 2, 2, 2, 1, 1])
    paths = pd.Series([f"test/a{i}.jpg" for i in range(6)] + [f"test/b{i}.jpg" for i in range(3)])
    groups = pd.Series(["a"] * 6 + ["b"] * 3, index=paths.to_numpy())
    params = tiny_params(groups={"csv": "unused.csv", "min_images": min_images})
    monkeypatch.setattr(module, "class_probabilities", _probabilities_of(scored))

    row = module.split_scores(scored, _images(levels), labels, paths, params, groups, fill=128, focus="b",
                              device=torch.device("cpu"))

    predicted = np.array([0, 0, 2, 1, 1, 2, 2, 1, 0])
    assert row["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert row["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro", labels=[0, 1, 2]))
    # a: 5/6 right, b: 2/3; with min_images 4 only a is ranked
    assert (row["worst_group"], row["worst_group_accuracy"]) == (("b", pytest.approx(2 / 3)) if min_images == 2
                                                                 else ("a", pytest.approx(5 / 6)))
    focus = row["focus"]
    assert focus["accuracy"]["value"] == pytest.approx(2 / 3)
    assert focus["pneumonia_sensitivity"]["value"] == pytest.approx(1.0)  # b0: PNEUMONIA called PNEUMONIA
    assert focus["normal_sensitivity"]["value"] == pytest.approx(0.5)     # b1 right, b2 called COVID19
    score = _pair_score(scored, _images([255, 128, 0]))  # b0 PNEUMONIA; b1, b2 NORMAL
    assert focus["pneumonia_vs_normal_auc"]["value"] == pytest.approx(roc_auc_score(labels[6:] == 2, score))
    fpr, tpr, _ = roc_curve(labels[6:] == 2, score, drop_intermediate=False)
    assert focus["best_pneumonia_sensitivity_at_target"]["value"] == pytest.approx(tpr[1 - fpr >= 0.85].max())
    assert [(film["path"], film["label"], film["predicted"]) for film in row["focus_misclassified"]] == [
        ("test/b2.jpg", "NORMAL", "COVID19")]
    # every box hidden with 128: all called NORMAL (class 1)
    assert row["lungs_hidden_accuracy"] == pytest.approx(np.mean(labels == 1))


def test_a_focus_collection_absent_from_the_split_leaves_its_columns_empty(monkeypatch):
    """With the focus collection in ``split.unseen_groups`` validation holds none of its films."""
    module, scored = _script(), BoxBrightness()
    labels = np.array([0, 1, 2])
    paths = pd.Series([f"val/a{i}.jpg" for i in range(3)])
    groups = pd.Series(["a"] * 3, index=paths.to_numpy())
    params = tiny_params(groups={"csv": "unused.csv", "min_images": 2})
    monkeypatch.setattr(module, "class_probabilities", _probabilities_of(scored))

    row = module.split_scores(scored, _images([0, 128, 255]), labels, paths, params, groups, fill=128, focus="b",
                              device=torch.device("cpu"))

    assert (row["focus"], row["focus_misclassified"], row["accuracy"]) == ({}, [], pytest.approx(1.0))


def _probabilities_of(model: nn.Module):
    """class_probabilities for the stand-in: pixels scaled to [-1, 1] as the models' input normalisation does."""

    def probabilities(_, images: np.ndarray, *args, **kwargs) -> np.ndarray:
        x = torch.from_numpy(images).float()[:, None] / 127.5 - 1.0
        return torch.softmax(model(x), dim=1).numpy()
    return probabilities


def _pair_score(model: nn.Module, images: np.ndarray) -> np.ndarray:
    probs = _probabilities_of(model)(None, images)
    return probs[:, 2] / (probs[:, 1] + probs[:, 2])


def test_the_table_prints_each_option_and_split_with_intervals():
    entry = {"value": 0.5, "ci_low": 0.25, "ci_high": 0.75}
    row = {"accuracy": 0.9, "macro_f1": 0.8, "worst_group": "b", "worst_group_accuracy": 0.6, "lungs_hidden_accuracy": 0.4,
           "focus": {"accuracy": entry, "pneumonia_sensitivity": None, "normal_sensitivity": entry,
                     "pneumonia_vs_normal_auc": entry}}  # no best operating point: one class missing
    lines = _script().markdown({"keep-none": {"val": row}}, "b").splitlines()
    assert lines[-1] == ("| keep-none | val | 0.9000 | 0.8000 | 0.6000 (b) | 0.500 [0.250, 0.750] | - | "
                         "0.500 [0.250, 0.750] | 0.500 [0.250, 0.750] | - | 0.4000 |")

