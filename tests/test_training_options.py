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

from cxr.errors import PipelineError
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
    assert row["focus_group"] == "b"
    assert [film["prob_PNEUMONIA"] for film in row["films"]] == pytest.approx(
        _probabilities_of(scored)(None, _images(levels))[:, 2], abs=1e-4)
    assert [(film["path"], film["group"], film["predicted"]) for film in row["films"]] == [
        (path, group, ["COVID19", "NORMAL", "PNEUMONIA"][p]) for path, group, p in zip(paths, groups, predicted)]
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

    assert (row["focus"], row["accuracy"]) == ({}, pytest.approx(1.0))
    assert {film["group"] for film in row["films"]} == {"a"}


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
    lines = _script().markdown({"keep-none": {"val": row, "test": row}}, "b").splitlines()
    assert lines[-1].startswith("| keep-none | test | 0.9000 |")
    assert lines[-2] == ("| keep-none | val | 0.9000 | 0.8000 | 0.6000 (b) | 0.500 [0.250, 0.750] | - | "
                         "0.500 [0.250, 0.750] | 0.500 [0.250, 0.750] | - | 0.4000 |")



def _run(option: str, seed: int, val_f1: float, val_worst: float, test_auc: float | None, test_sens: float = 0.5,
         test_f1: float = 0.95):
    focus = {} if test_auc is None else {"pneumonia_vs_normal_auc": {"value": test_auc},
                                         "pneumonia_sensitivity": {"value": test_sens}}
    return {"option": option, "seed": seed, "val": {"macro_f1": val_f1, "worst_group_accuracy": val_worst},
            "test": {"macro_f1": test_f1, "focus": focus}}


def test_the_seed_summary_is_each_options_mean_and_range_and_the_rule_picks_on_it():
    module = _script()
    runs = {"a-seed1": _run("a", 1, 0.95, 0.70, 0.86, 0.4), "a-seed2": _run("a", 2, 0.93, 0.76, 0.88, 0.5, 0.96),
            "b-seed1": _run("b", 1, 0.96, 0.74, 0.84), "b-seed3": _run("b", 3, 0.95, 0.71, 0.85),
            "c-seed1": _run("c", 1, 0.99, 0.90, None)}
    summary = module.across_seeds(runs)

    a = summary["a"]
    assert a["seeds"] == [1, 2]
    assert a["val_macro_f1"] == pytest.approx({"mean": np.mean([0.95, 0.93]), "min": 0.93, "max": 0.95})
    assert a["val_worst_group_accuracy"] == pytest.approx({"mean": 0.73, "min": 0.70, "max": 0.76})
    assert a["test_focus_auc"]["mean"] == pytest.approx(0.87)
    assert a["test_macro_f1"] == pytest.approx({"mean": 0.955, "min": 0.95, "max": 0.96})
    assert a["test_focus_pneumonia_sensitivity"] == pytest.approx({"mean": 0.45, "min": 0.4, "max": 0.5})
    assert summary["c"]["test_focus_auc"] is None
    # mean F1: a 0.94 (meets the floor), b 0.955, c 0.99; mean worst group: a 0.73, b 0.725, c 0.90
    assert module.chosen_option(summary) == "c"
    assert module.chosen_option({k: summary[k] for k in ("a", "b")}) == "a"
    below = {"a": summary["a"] | {"val_macro_f1": {"mean": 0.9399, "min": 0.93, "max": 0.95}}, "b": summary["b"]}
    assert module.chosen_option(below) == "b"
    assert module.chosen_option({"a": below["a"]}) is None


def test_the_seed_table_names_the_choice_or_says_none_reaches_the_floor():
    module = _script()
    summary = module.across_seeds({"a-seed1": _run("a", 1, 0.93, 0.70, 0.86), "a-seed2": _run("a", 2, 0.91, 0.76, 0.88),
                                   "b-seed1": _run("b", 1, 0.92, 0.60, None)})
    lines = module.seeds_markdown(summary, "f").splitlines()
    assert lines[4] == ("| a | 1, 2 | 0.9200 [0.9100, 0.9300] | 0.7300 [0.7000, 0.7600] | 0.9500 [0.9500, 0.9500] | "
                        "0.8700 [0.8600, 0.8800] | 0.5000 [0.5000, 0.5000] |")
    assert lines[5] == "| b | 1 | 0.9200 [0.9200, 0.9200] | 0.6000 [0.6000, 0.6000] | 0.9500 [0.9500, 0.9500] | - | - |"
    assert lines[-1].endswith("No option reaches the floor, so the rule chooses none; "
                              "the best mean validation worst group: a.")
    summary["b"]["val_macro_f1"]["mean"] = 0.94
    assert module.seeds_markdown(summary, "f").splitlines()[-1].endswith("Chosen: b.")


def test_each_seed_trains_its_own_run_and_every_run_lands_in_one_scores_file(tmp_path, monkeypatch):
    """Invocations into one --out (as parallel seeds run) keep each other's runs, even one written mid-run."""
    module, trained = _script(), []
    monkeypatch.setattr(module, "load_params", lambda _: tiny_params(groups={"csv": "unused.csv"}))

    def train(approach, params, processed, model_path, live, **kwargs):
        trained.append((params.train.seed, params.train_custom.balance, params.train_custom.epochs, model_path))
        model_path.parent.mkdir(parents=True)
        model_path.write_bytes(b"")
        if params.train.seed == 42:  # another invocation finishes its run while this one trains
            module.update_scores(out / "scores.json", "keep-crop-3-seed9", _run("keep-crop-3", 9, 0.9, 0.6, None))

    monkeypatch.setattr(module, "train_approach", train)
    monkeypatch.setattr(module, "option_scores", lambda model, *args: {
        split: {"macro_f1": 0.9, "worst_group_accuracy": 0.6, "focus": {}} for split in module.SPLITS})
    monkeypatch.setattr(module, "markdown", lambda *args: "")
    out = tmp_path / "out"
    common = ["--project", str(tmp_path), "--border", "keep", "--epochs", "3", "--out", str(out)]

    module.main([*common, "--balance", "none", "group", "--seeds", "7", "8"])
    module.main([*common, "--balance", "none"])  # the params' seed, 42; existing runs are scored, not retrained

    assert [(seed, balance, epochs) for seed, balance, epochs, _ in trained] == [
        (7, "none", 3), (8, "none", 3), (7, "group", 3), (8, "group", 3), (42, "none", 3)]
    assert [path.parent.name for *_, path in trained][-1] == "keep-none-3-seed42"
    scores = module.read_json(out / "scores.json")
    assert sorted(scores) == ["keep-crop-3-seed9", "keep-group-3-seed7", "keep-group-3-seed8", "keep-none-3-seed42",
                              "keep-none-3-seed7", "keep-none-3-seed8"]
    assert (scores["keep-none-3-seed8"]["option"], scores["keep-none-3-seed8"]["seed"]) == ("keep-none-3", 8)
    assert module.across_seeds(scores)["keep-none-3"]["seeds"] == [7, 8, 42]


def test_a_run_scored_before_seeds_were_recorded_is_named_not_a_traceback():
    with pytest.raises(PipelineError, match="keep-none-36 was scored before runs recorded their seed"):
        _script().across_seeds({"keep-none-36": {"val": {}, "test": {}}})
