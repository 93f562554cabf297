"""The shortcut audit flags a model that reads a planted corner mark, and passes one that reads the centre.

Two generated data sets of the same noise: in one the class is written only in a corner
(outside the lung box), in the other only inside the box. A custom CNN and the border probe
are trained on each; the audit must flag the first (model and data set) and not the second,
so neither a test that always flags nor one that never does can pass both.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxr.data.preprocess import save_split
from cxr.evaluation.inference import load_trained_model
from cxr.evaluation.occlusion import chance_scores, class_probabilities, neutral_grey, occluded
from cxr.lung_box import center_box
from cxr.params import CLASSES, ShortcutsParams
from cxr.reporting.shortcut_audit import shortcut_audit
from cxr.reporting.shortcuts import model_verdict, retained_share, shortcuts_markdown, shortcuts_png
from cxr.training.loop import train_approach

from test_train import tiny_params

SIZE = 128  # the custom CNN downsamples 32x: its Grad-CAM map is 4 x 4 here
SETTINGS = ShortcutsParams(center_fraction=0.5, cam_per_class=8)
CPU = torch.device("cpu")


def generated_split(per_class: int, signal: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noise images whose class shows only in a corner mark (``corner``) or only as the box's brightness (``center``)."""
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    images = rng.integers(70, 190, size=(len(labels), SIZE, SIZE)).astype(np.uint8)
    rows, cols = center_box(SIZE, SETTINGS.center_fraction)
    for index, label in enumerate(labels):
        if signal == "corner":
            mark = SIZE // 6
            top, left = [(0, 0), (0, SIZE - mark), (SIZE - mark, 0)][label]
            images[index, top : top + mark, left : left + mark] = 255
        else:
            images[index, rows, cols] = np.clip(images[index, rows, cols].astype(int) - 60 + 60 * label, 0, 255)
    return images, labels


def write_splits(folder: Path, signal: str, hide_center: bool = False) -> int:
    """Train/val/test splits under ``folder``; returns the fill grey the audit uses for hidden pixels."""
    rng = np.random.default_rng(0)
    splits = {name: generated_split(count, signal, rng) for name, count in (("train", 40), ("val", 10), ("test", 20))}
    fill = neutral_grey(splits["train"][0])
    for name, (images, labels) in splits.items():
        rows = pd.DataFrame({"path": [f"{name}/{i}.png" for i in range(len(labels))],
                             "label": np.asarray(CLASSES)[labels], "patient": [f"{name}{i}" for i in range(len(labels))]})
        shown = occluded(images, "center_hidden", SETTINGS.center_fraction, fill) if hide_center else images
        save_split(folder, name, shown, rows)
    return fill


def trained(folder: Path, name: str) -> torch.nn.Module:
    params = tiny_params(train_custom={"epochs": 8, "batch_size": 16, "ema_decay": 0.0, "lr": 0.01})
    train_approach("custom", params, folder, folder / f"{name}.pt", folder / f"live-{name}", progress=False)
    return load_trained_model(folder / f"{name}.pt", list(CLASSES), CPU)[0]


def audit_of(tmp_path: Path, signal: str) -> dict:
    fill = write_splits(tmp_path / "data", signal)
    write_splits(tmp_path / "probe", signal, hide_center=True)
    model, probe = trained(tmp_path / "data", "model"), trained(tmp_path / "probe", "probe")
    test = np.load(tmp_path / "data" / "test.npy")
    labels = np.repeat(np.arange(len(CLASSES)), 20)
    score = partial(class_probabilities, batch_size=32, device=CPU)
    return shortcut_audit({"custom": (model, model)}, probe, test, labels, list(CLASSES), fill, SETTINGS, score, 200, 0)


@pytest.fixture(scope="module")
def corner_audit(tmp_path_factory) -> dict:
    return audit_of(tmp_path_factory.mktemp("corner"), "corner")


@pytest.fixture(scope="module")
def center_audit(tmp_path_factory) -> dict:
    return audit_of(tmp_path_factory.mktemp("center"), "center")


def test_a_class_written_in_a_corner_is_flagged_by_occlusion_and_by_the_probe(corner_audit):
    model = corner_audit["models"]["custom"]
    assert model["intact"]["accuracy"]["value"] > 0.9
    assert model["center_hidden"]["accuracy"]["value"] > 0.9  # the lungs were never needed
    assert model["flagged"] and "outside the lungs" in model["reading"]
    assert corner_audit["probe"]["flagged"]
    assert corner_audit["probe"]["center_hidden"]["accuracy"]["value"] > 0.9


def test_a_class_shown_only_in_the_lung_box_is_not_flagged(center_audit):
    model = center_audit["models"]["custom"]
    chance = center_audit["chance"]["accuracy"]
    assert model["intact"]["accuracy"]["value"] > 0.9
    assert model["border_hidden"]["accuracy"]["value"] > 0.9
    assert model["center_hidden"]["accuracy"]["value"] < chance + 0.2
    assert not model["flagged"] and "relies mostly on the lung fields" in model["reading"]
    assert not center_audit["probe"]["flagged"]


def test_grad_cam_mass_sits_inside_the_box_when_the_signal_does(center_audit, corner_audit):
    inside = center_audit["models"]["custom"]["cam_inside_center"]["all"]["value"]
    outside = corner_audit["models"]["custom"]["cam_inside_center"]["all"]["value"]
    assert inside > outside
    assert set(center_audit["models"]["custom"]["cam_inside_center"]["per_class"]) == set(CLASSES)


def test_the_report_section_and_figure_name_every_model_and_the_probe(corner_audit, tmp_path):
    section = shortcuts_markdown(corner_audit)
    assert "Does the model read the lungs?" in section and "Border probe" in section and "Custom CNN" in section
    shortcuts_png(corner_audit, tmp_path / "shortcuts.png")
    assert (tmp_path / "shortcuts.png").read_bytes().startswith(b"\x89PNG")


def test_hiding_the_centre_or_the_border_touches_only_that_part():
    images = np.arange(8 * 8, dtype=np.uint8).reshape(1, 8, 8)
    rows, cols = center_box(8, 0.5)
    assert (rows, cols) == (slice(2, 6), slice(2, 6))
    center = occluded(images, "center_hidden", 0.5, 7)
    border = occluded(images, "border_hidden", 0.5, 7)
    assert (center[0, rows, cols] == 7).all() and (border[0, rows, cols] == images[0, rows, cols]).all()
    mask = np.ones((8, 8), bool)
    mask[rows, cols] = False
    assert (center[0][mask] == images[0][mask]).all() and (border[0][mask] == 7).all()
    assert np.array_equal(occluded(images, "intact", 0.5, 7), images)
    with pytest.raises(ValueError, match="unknown view"):
        occluded(images, "left_half", 0.5, 7)


def test_chance_and_retained_share():
    assert chance_scores(np.array([0, 0, 1, 2]), 3) == {"accuracy": 0.375, "f1_macro": pytest.approx(1 / 3)}
    assert retained_share(0.9, 0.5, 0.3) == pytest.approx(1 / 3)
    assert retained_share(0.3, 0.6, 0.3) == 0.0  # no skill to keep


def test_a_model_that_fails_on_either_part_alone_is_not_said_to_read_the_lungs():
    def scores(accuracy: float) -> dict:
        return {"accuracy": {"value": accuracy}}

    entry = {"intact": scores(0.955), "center_hidden": scores(0.617), "border_hidden": scores(0.319)}
    verdict = model_verdict(entry, chance=0.335, flag_share=0.5)
    assert not verdict["flagged"] and verdict["retained_share"] == pytest.approx(0.4548, abs=1e-4)
    assert "cannot show that it reads the lungs" in verdict["reading"]
    assert "relies mostly" not in verdict["reading"]
