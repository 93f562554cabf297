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

from cxr.data.preprocess import load_split, save_split
from cxr.evaluation.inference import load_trained_model
from cxr.evaluation.shortcut_occlusion import chance_scores, class_probabilities, neutral_grey, occluded, write_probe_splits
from cxr.lung_box import center_box
from cxr.params import CLASSES, ShortcutsParams
from cxr.reporting.shortcut_audit import shortcut_audit
from cxr.reporting.shortcut_report import (
    model_scores,
    model_verdict,
    probe_verdict,
    retained_share,
    share_interval,
    shortcuts_markdown,
    shortcuts_png,
)
from cxr.training.loop import train_approach
from cxr.training.models import build_model

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


def write_splits(folder: Path, signal: str) -> int:
    """Train/val/test splits under ``folder``; returns the fill grey the audit uses for hidden pixels."""
    rng = np.random.default_rng(0)
    splits = {name: generated_split(count, signal, rng) for name, count in (("train", 40), ("val", 10), ("test", 20))}
    for name, (images, labels) in splits.items():
        rows = pd.DataFrame({"path": [f"{name}/{i}.png" for i in range(len(labels))],
                             "label": np.asarray(CLASSES)[labels], "patient": [f"{name}{i}" for i in range(len(labels))]})
        save_split(folder, name, images, rows)
    return neutral_grey(splits["train"][0])


def trained(folder: Path, name: str) -> torch.nn.Module:
    params = tiny_params(train_custom={"epochs": 8, "batch_size": 16, "ema_decay": 0.0, "lr": 0.01})
    train_approach("custom", params, folder, folder / f"{name}.pt", folder / f"live-{name}", progress=False)
    return load_trained_model(folder / f"{name}.pt", list(CLASSES), CPU)[0]


def audit_of(tmp_path: Path, signal: str) -> dict:
    fill = write_splits(tmp_path / "data", signal)
    assert write_probe_splits(tmp_path / "data", tmp_path / "probe", CLASSES, SETTINGS.center_fraction) == fill
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


@pytest.mark.slow
def test_a_class_written_in_a_corner_is_flagged_by_occlusion_and_by_the_probe(corner_audit):
    model = corner_audit["models"]["custom"]
    assert model["intact"]["accuracy"]["value"] > 0.9
    assert model["center_hidden"]["accuracy"]["value"] > 0.9  # the lungs were never needed
    assert model["flagged"] and "outside the lungs" in model["reading"]
    assert corner_audit["probe"]["flagged"]
    assert corner_audit["probe"]["center_hidden"]["accuracy"]["value"] > 0.9


@pytest.mark.slow
def test_a_class_shown_only_in_the_lung_box_is_not_flagged(center_audit):
    model = center_audit["models"]["custom"]
    chance = center_audit["chance"]["accuracy"]
    assert model["intact"]["accuracy"]["value"] > 0.9
    assert model["border_hidden"]["accuracy"]["value"] > 0.9
    assert model["center_hidden"]["accuracy"]["value"] < chance + 0.2
    assert not model["flagged"] and "relies mostly on the lung fields" in model["reading"]
    assert not center_audit["probe"]["flagged"]


@pytest.mark.slow
def test_grad_cam_mass_sits_inside_the_box_when_the_signal_does(center_audit, corner_audit):
    inside = center_audit["models"]["custom"]["cam_inside_center"]["all"]["value"]
    outside = corner_audit["models"]["custom"]["cam_inside_center"]["all"]["value"]
    assert inside > outside
    assert set(center_audit["models"]["custom"]["cam_inside_center"]["per_class"]) == set(CLASSES)


@pytest.mark.slow
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


def test_the_probe_data_hides_the_box_with_the_training_grey_and_leaves_the_border(tmp_path):
    rng = np.random.default_rng(1)
    side = SIZE // 4
    splits = {name: rng.integers(0, 256, size=(count, side, side)).astype(np.uint8)
              for name, count in (("train", 4), ("val", 2), ("test", 3))}
    for name, images in splits.items():
        rows = pd.DataFrame({"path": [f"{name}/{i}.png" for i in range(len(images))],
                             "label": np.asarray(CLASSES)[np.arange(len(images)) % 3],
                             "patient": [f"{name}{i}" for i in range(len(images))]})
        save_split(tmp_path / "processed", name, images, rows)

    fill = write_probe_splits(tmp_path / "processed", tmp_path / "probe", CLASSES, 0.5)

    assert fill == round(float(splits["train"].astype(np.float64).mean()))  # the training split's mean grey
    rows, cols = center_box(side, 0.5)
    border = np.ones((side, side), bool)
    border[rows, cols] = False
    for name, images in splits.items():
        hidden, labels, table = load_split(tmp_path / "probe", name, CLASSES)
        assert (hidden[:, rows, cols] == fill).all()
        assert np.array_equal(hidden[:, border], images[:, border])
        pd.testing.assert_frame_equal(table, load_split(tmp_path / "processed", name, CLASSES)[2])
        assert labels.tolist() == (np.arange(len(images)) % 3).tolist()


# --- verdicts: only where the intervals carry them ---------------------------------------------------


def ci(value: float, low: float, high: float) -> dict[str, float]:
    return {"value": value, "ci_low": low, "ci_high": high}


def scored(intact: tuple, hidden: tuple, lungs_only: tuple, kept: tuple, kept_by_lungs: tuple) -> dict:
    """A model's audit entry with hand-set accuracies and retained shares (value, low, high)."""
    return {"intact": {"accuracy": ci(*intact)}, "center_hidden": {"accuracy": ci(*hidden)},
            "border_hidden": {"accuracy": ci(*lungs_only)}, "retained_share": ci(*kept),
            "lungs_only_share": ci(*kept_by_lungs)}


@pytest.mark.parametrize(("entry", "verdict", "words"), [
    # A 1-epoch mini run: intact 0.375 [0.333, 0.458] at chance 0.333 kept "100%" of its 0.04 above chance.
    (scored((0.375, 0.333, 0.458), (0.375, 0.333, 0.458), (0.35, 0.3, 0.42), (1.0, -1.0, 3.0), (0.4, -2.0, 3.0)),
     "none", "No verdict: its intact accuracy 0.375 [0.333, 0.458] is not above chance"),
    (scored((0.8, 0.7, 0.9), (0.58, 0.45, 0.7), (0.7, 0.6, 0.8), (0.53, 0.3, 0.75), (0.8, 0.65, 0.95)),
     "none", "an interval on both sides of the flag at 50%"),
    (scored((0.95, 0.92, 0.98), (0.93, 0.9, 0.96), (0.4, 0.35, 0.45), (0.97, 0.9, 1.03), (0.1, 0.0, 0.2)),
     "shortcut", "it decides largely from outside the lungs"),
    (scored((0.95, 0.92, 0.98), (0.36, 0.3, 0.42), (0.93, 0.9, 0.96), (0.04, -0.05, 0.13), (0.97, 0.9, 1.03)),
     "lungs", "it relies mostly on the lung fields"),
    (scored((0.955, 0.94, 0.97), (0.617, 0.59, 0.64), (0.319, 0.3, 0.34), (0.45, 0.41, 0.49), (-0.03, -0.06, 0.0)),
     "both", "cannot show that it reads the lungs"),
    (scored((0.9, 0.85, 0.95), (0.4, 0.33, 0.47), (0.65, 0.55, 0.75), (0.12, 0.0, 0.24), (0.55, 0.35, 0.75)),
     "none", "no verdict on whether it reads the lungs"),
])
def test_a_model_gets_a_verdict_only_when_both_intervals_lie_on_one_side(entry, verdict, words):
    result = model_verdict(entry, chance=0.335 if verdict == "both" else 1 / 3, flag_share=0.5)
    assert result["verdict"] == verdict and result["flagged"] == (verdict == "shortcut")
    assert words in result["reading"]
    for claim in ("outside the lungs", "relies mostly", "cannot show"):
        assert (claim in result["reading"]) == (claim in words)


@pytest.mark.parametrize(("accuracy", "verdict", "words"), [
    ((0.95, 0.9, 0.99), "shortcut", "can be solved largely from outside the lungs"),
    ((0.34, 0.28, 0.40), "clear", "little to learn the classes from"),
    ((0.42, 0.36, 0.49), "none", "no verdict"),  # the bar, chance + 0.1 = 0.433, lies inside the interval
])
def test_the_probe_gets_a_verdict_only_when_its_interval_clears_chance_plus_the_margin(accuracy, verdict, words):
    result = probe_verdict({"center_hidden": {"accuracy": ci(*accuracy)}}, chance=1 / 3, probe_margin=0.1)
    assert result["verdict"] == verdict and result["flagged"] == (verdict == "shortcut") and words in result["reading"]


def predictions(labels: np.ndarray, right: np.ndarray) -> np.ndarray:
    """One-hot probabilities that are right where ``right`` is and name the next class elsewhere."""
    return np.eye(3)[np.where(right, labels, (labels + 1) % 3)]


def paired_views(per_class: int, both: float, intact_only: float, hidden_only: float, seed: int,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and correctness in two views with exactly these shares of every class right in both / one view."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    intact, hidden = np.zeros(len(labels), bool), np.zeros(len(labels), bool)
    for k in range(3):
        members = rng.permutation(np.flatnonzero(labels == k))
        ends = np.round(np.cumsum([both, intact_only, hidden_only]) * per_class).astype(int)
        intact[members[: ends[1]]] = True
        hidden[members[: ends[0]]] = True
        hidden[members[ends[1] : ends[2]]] = True
    return labels, intact, hidden


@pytest.mark.parametrize(("both", "intact_only", "hidden_only"), [(0.65, 0.25, 0.05), (0.3, 0.55, 0.1), (0.85, 0.05, 0.05)])
def test_retained_share_interval_matches_the_delta_method_for_paired_views(both, intact_only, hidden_only):
    labels, intact, hidden = paired_views(600, both, intact_only, hidden_only, seed=0)
    chance, n = 1 / 3, len(labels)
    i, h = both + intact_only, both + hidden_only
    share = (h - chance) / (i - chance)
    variance = (h * (1 - h) + share**2 * i * (1 - i) - 2 * share * (both - h * i)) / n / (i - chance) ** 2
    entry = share_interval(labels, np.where(intact, labels, (labels + 1) % 3), np.where(hidden, labels, (labels + 1) % 3),
                           chance, resamples=2000, seed=0)
    assert entry["value"] == pytest.approx(share, abs=1e-6)
    half = 1.959964 * np.sqrt(variance)
    assert (entry["ci_high"] - entry["ci_low"]) / (2 * half) == pytest.approx(1, abs=0.1)
    assert (entry["value"] - entry["ci_low"]) / half == pytest.approx(1, abs=0.15)
    assert (entry["ci_high"] - entry["value"]) / half == pytest.approx(1, abs=0.15)


def test_model_scores_give_no_verdict_at_chance_and_a_flag_on_a_clear_shortcut():
    labels = np.repeat(np.arange(3), 8)
    at_chance = np.arange(24) % 8 < 3  # 9 of 24 right in every view: 0.375 against chance 1/3
    views = {view: predictions(labels, at_chance) for view in ("intact", "center_hidden", "border_hidden")}
    chance = chance_scores(labels, 3)["accuracy"]
    weak = model_verdict(model_scores(labels, views, chance, resamples=200, seed=0), chance, flag_share=0.5)
    assert weak["intact"]["accuracy"]["value"] == 0.375 and weak["retained_share"]["value"] == 1.0
    assert weak["verdict"] == "none" and not weak["flagged"] and "not above chance" in weak["reading"]

    labels, intact, hidden = paired_views(100, 0.9, 0.05, 0.0, seed=1)  # keeps 0.9 of 0.95 with the lungs hidden
    views = {"intact": predictions(labels, intact), "center_hidden": predictions(labels, hidden),
             "border_hidden": predictions(labels, np.arange(300) % 3 == 0)}
    strong = model_verdict(model_scores(labels, views, chance, resamples=200, seed=0), chance, flag_share=0.5)
    assert strong["retained_share"]["ci_low"] > 0.5 and strong["flagged"]
    markdown = shortcuts_markdown({"chance": {"accuracy": chance, "f1_macro": 1 / 3}, "center_fraction": 0.5,
                                   "models": {"custom": {**weak, "cam_inside_center": {"all": ci(0.5, 0.4, 0.6)}},
                                              "extract": {**strong, "cam_inside_center": {"all": ci(0.5, 0.4, 0.6)}}},
                                   "probe": probe_verdict({"center_hidden": weak["intact"]}, chance, 0.1)})
    custom_row, extract_row = (line for line in markdown.splitlines() if line.startswith(("| Custom", "| Feature")))
    assert custom_row.endswith("| no verdict |") and extract_row.endswith("| shortcut |")


# --- hide and crop models: numbers met by construction carry no verdict --------------------------------

SHORTCUT_LIKE = scored((0.95, 0.92, 0.98), (0.93, 0.9, 0.96), (0.4, 0.35, 0.45), (0.97, 0.9, 1.03), (0.1, 0.0, 0.2))
LUNGS_LIKE = scored((0.95, 0.92, 0.98), (0.36, 0.3, 0.42), (0.93, 0.9, 0.96), (0.04, -0.05, 0.13), (0.97, 0.9, 1.03))


@pytest.mark.parametrize("border", ["hide", "crop"])
@pytest.mark.parametrize(("entry", "verdict_if_kept"), [(SHORTCUT_LIKE, "shortcut"), (LUNGS_LIKE, "lungs")])
def test_a_hide_or_crop_model_gets_no_verdict_from_the_lungs_hidden_view(border, entry, verdict_if_kept):
    assert model_verdict({**entry, "border": "keep"}, chance=1 / 3, flag_share=0.5)["verdict"] == verdict_if_kept
    result = model_verdict({**entry, "border": border}, chance=1 / 3, flag_share=0.5)
    assert result["verdict"] == "none" and not result["flagged"]
    assert result["reading"].startswith(f"No verdict, by construction: trained with border: {border},")
    for claim in ("outside the lungs, such", "relies mostly", "%"):  # no reading drawn from the numbers
        assert claim not in result["reading"]


def test_the_audit_records_the_border_and_gives_a_crop_model_no_grad_cam_mass():
    torch.manual_seed(0)
    models = {name: build_model("custom_cnn", 3, [0.5], [0.25], width=8, lung_box=box, crop=name == "finetune").eval()
              for name, box in (("custom", 0.0), ("extract", 0.5), ("finetune", 0.5))}
    images = np.random.default_rng(0).integers(0, 256, size=(12, 64, 64)).astype(np.uint8)
    labels = np.repeat(np.arange(3), 4)
    score = partial(class_probabilities, batch_size=32, device=CPU)
    audit = shortcut_audit({name: (model, model) for name, model in models.items()}, models["custom"], images, labels,
                           list(CLASSES), 128, ShortcutsParams(center_fraction=0.5, cam_per_class=2), score, 50, 0)
    entries = audit["models"]
    assert [entries[name]["border"] for name in models] == ["keep", "hide", "crop"]
    assert entries["finetune"]["cam_inside_center"] is None
    assert set(entries["extract"]["cam_inside_center"]["per_class"]) == set(CLASSES)
    assert all("by construction" in entries[name]["reading"] for name in ("extract", "finetune"))
    assert "by construction" not in entries["custom"]["reading"]
    rows = {line.split(" | ")[0]: line for line in shortcuts_markdown(audit).splitlines() if line.startswith("| ")}
    assert rows["| Fine-tuning (ResNet-18)"].endswith("| - (crops to the box: 1 by construction) | "
                                                  "no verdict (border: crop, by construction) |")
    assert rows["| Feature extraction (ResNet-18)"].endswith("| no verdict (border: hide, by construction) |")
