"""Tests for cxr.reporting.figures and pngs: valid and reproducible PNGs, well-formed curve tables, legend and title text."""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxr import stats
from cxr.errors import PipelineError
from cxr.evaluation.saliency import select_examples
from cxr.reporting import figures, pngs
from cxr.reporting.saliency_gallery import gallery
from cxr.reporting.tables import bar_chart, summary_table

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def predictions_table(n: int, skill: float, seed: int) -> pd.DataFrame:
    """A predictions table like the evaluate stage writes: higher ``skill`` puts more probability on the true class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=n)
    logits = rng.normal(size=(n, len(CLASSES)))
    logits[np.arange(n), labels] += skill
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = pd.DataFrame(
        {
            "path": [f"Data/test/{CLASSES[k]}/{i}.jpg" for i, k in enumerate(labels)],
            "label": np.asarray(CLASSES)[labels],
            "predicted": np.asarray(CLASSES)[probs.argmax(axis=1)],
        }
    )
    for index, name in enumerate(CLASSES):
        frame[f"prob_{name}"] = probs[:, index].round(6)
    return frame


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    return {"custom": predictions_table(60, 1.0, seed=1), "finetune": predictions_table(60, 3.0, seed=2)}


def calibrated_probs(frame: pd.DataFrame) -> np.ndarray:
    logits = stats.logits_from_probabilities(frame[[f"prob_{name}" for name in CLASSES]].to_numpy())
    return stats.apply_temperature(logits, 2.0)


def scores_table() -> pd.DataFrame:
    metrics = {
        "custom": {"accuracy": 0.81, "precision_macro": 0.78, "recall_macro": 0.76, "f1_macro": 0.77},
        "finetune": {"accuracy": 0.93, "precision_macro": 0.91, "recall_macro": 0.92, "f1_macro": 0.915},
    }
    return summary_table(metrics)


def draw_gallery(frame: pd.DataFrame, path: Path) -> None:
    """The Grad-CAM gallery on fixed random images and heatmaps (the drawing, not the model, is under test)."""
    examples = select_examples(frame, CLASSES, per_class=2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(examples), 24, 24), dtype=np.uint8)
    heatmaps = rng.random((len(examples), 24, 24), dtype=np.float32)
    gallery(images, heatmaps, examples, CLASSES, "custom", path)


def render_all(frames: dict[str, pd.DataFrame], folder: Path) -> dict[str, bytes]:
    outputs = {
        "confusion": folder / "confusion.png",
        "roc_pr": folder / "roc_pr.png",
        "reliability": folder / "nested" / "reliability.png",
        "bar_chart": folder / "compare.png",
        "gradcam": folder / "evaluate" / "custom" / "gradcam.png",
    }
    figures.confusion_png(frames["custom"], CLASSES, "Custom CNN", outputs["confusion"])
    figures.roc_pr_png(frames, CLASSES, outputs["roc_pr"])
    figures.reliability_png(frames, CLASSES, outputs["reliability"], calibrated={"custom": calibrated_probs(frames["custom"])})
    bar_chart(scores_table(), outputs["bar_chart"])
    draw_gallery(frames["custom"], outputs["gradcam"])
    return {name: path.read_bytes() for name, path in outputs.items()}


def test_every_figure_is_a_png_and_identical_when_rendered_twice(frames, tmp_path):
    first = render_all(frames, tmp_path / "first")
    second = render_all(frames, tmp_path / "second")
    for name, content in first.items():
        assert content.startswith(PNG_MAGIC), name
        assert content == second[name], f"{name} differs between two renders of the same inputs"


def test_png_carries_no_matplotlib_version_or_date(frames, tmp_path):
    rendered = render_all(frames, tmp_path)
    content = rendered["confusion"]
    assert b"matplotlib" not in content.lower()
    assert b"Creation Time" not in content
    for name, content in rendered.items():
        assert b"matplotlib" not in content.lower(), name
        assert b"Creation Time" not in content and b"tIME" not in content, name


def test_every_png_has_no_text_chunks_and_leaves_no_temporary_file(frames, tmp_path):
    render_all(frames, tmp_path)
    written = sorted(tmp_path.rglob("*"))
    assert [path.name for path in written if path.is_file() and not path.name.endswith(".png")] == []
    for path in written:
        if path.is_file():
            with Image.open(path) as picture:
                assert picture.format == "PNG" and "Software" not in picture.info and not picture.text, path


def test_png_figure_closes_the_figure_and_writes_nothing_when_drawing_fails(tmp_path):
    open_before = plt.get_fignums()
    with pytest.raises(RuntimeError, match="drawing failed"):
        with pngs.png_figure(tmp_path / "sub" / "f.png", 100) as (_, axes):
            axes[0, 0].plot([0, 1], [0, 1])
            raise RuntimeError("drawing failed")
    assert plt.get_fignums() == open_before
    assert not (tmp_path / "sub" / "f.png").exists()


def test_save_png_closes_the_figure_even_when_writing_fails(tmp_path, monkeypatch):
    figure = plt.figure()

    def broken_savefig(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        pngs.save_png(figure, tmp_path / "f.png", 100)
    assert figure.number not in plt.get_fignums()
    assert list(tmp_path.iterdir()) == []


def test_confusion_counts_put_true_class_on_rows():
    frame = pd.DataFrame(
        {"label": ["COVID19", "COVID19", "NORMAL", "PNEUMONIA"], "predicted": ["COVID19", "NORMAL", "NORMAL", "NORMAL"]}
    )
    assert figures.confusion_counts(frame, CLASSES).tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_confusion_png_handles_a_class_with_no_images(tmp_path):
    frame = pd.DataFrame({"label": ["NORMAL", "PNEUMONIA"], "predicted": ["NORMAL", "NORMAL"]})
    figures.confusion_png(frame, CLASSES, "no COVID19", tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)


def test_roc_table_is_monotone_and_runs_from_origin_to_one_one(frames):
    roc, _ = figures.roc_pr_curves(frames, CLASSES)
    assert list(roc.columns) == ["model", "class", "fpr", "tpr"]
    groups = roc.groupby(["model", "class"], sort=False)
    assert list(groups.groups) == [(model, name) for model in frames for name in CLASSES]
    for key, curve in groups:
        assert curve["fpr"].is_monotonic_increasing and curve["tpr"].is_monotonic_increasing, key
        assert (curve["fpr"].iloc[0], curve["tpr"].iloc[0]) == (0.0, 0.0), key
        assert (curve["fpr"].iloc[-1], curve["tpr"].iloc[-1]) == (1.0, 1.0), key


def test_roc_table_area_matches_sklearn_auc(frames):
    roc, _ = figures.roc_pr_curves(frames, CLASSES)
    frame = frames["custom"]
    curve = roc[(roc["model"] == "custom") & (roc["class"] == "NORMAL")]
    expected = roc_auc_score(frame["label"] == "NORMAL", frame["prob_NORMAL"])
    assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(expected, abs=1e-4)


def test_pr_table_recall_falls_to_zero_and_values_are_rounded(frames):
    roc, pr = figures.roc_pr_curves(frames, CLASSES)
    assert list(pr.columns) == ["model", "class", "recall", "precision"]
    for key, curve in pr.groupby(["model", "class"], sort=False):
        assert curve["recall"].is_monotonic_decreasing, key
        assert curve["recall"].iloc[0] == 1.0 and curve["recall"].iloc[-1] == 0.0, key
        assert curve["precision"].between(0, 1).all(), key
    for table, columns in ((roc, ["fpr", "tpr"]), (pr, ["recall", "precision"])):
        values = table[columns].to_numpy()
        assert np.array_equal(values, values.round(5))


def test_curves_leave_out_a_class_absent_from_a_table(frames):
    without_covid = frames["custom"][frames["custom"]["label"] != "COVID19"]
    roc, pr = figures.roc_pr_curves({"custom": without_covid}, CLASSES)
    assert set(roc["class"]) == set(pr["class"]) == {"NORMAL", "PNEUMONIA"}


def test_legend_labels_quote_the_stats_auc(frames):
    labels = figures.curve_legend_labels(frames, CLASSES)
    frame = frames["finetune"]
    aucs = stats.roc_auc_per_class(
        stats.encode_labels(frame["label"], CLASSES), frame[[f"prob_{name}" for name in CLASSES]].to_numpy(), CLASSES
    )
    roc_label, pr_label = labels["PNEUMONIA"]["finetune"]
    assert roc_label == f"finetune (AUC {aucs['PNEUMONIA']:.3f})"
    assert pr_label.startswith("finetune (AP 0.")
    assert list(labels) == CLASSES and list(labels["COVID19"]) == ["custom", "finetune"]


def drawn_panels(monkeypatch) -> list[dict[str, object]]:
    """Capture the axes of the next PNG drawn (title, legend, lines) instead of writing it."""
    panels: list[dict[str, object]] = []

    def capture(figure, path, dpi):
        for ax in figure.axes:
            legend = ax.get_legend()
            panels.append({
                "title": ax.get_title(),
                "legend": [text.get_text() for text in legend.get_texts()] if legend else [],
                "limits": (ax.get_xlim(), ax.get_ylim()),
                "lines": len(ax.get_lines()),
            })
        plt.close(figure)

    monkeypatch.setattr(pngs, "save_png", capture)
    return panels


def test_roc_pr_png_legend_quotes_curve_legend_labels_one_row_per_class(frames, tmp_path, monkeypatch):
    panels = drawn_panels(monkeypatch)
    figures.roc_pr_png(frames, CLASSES, tmp_path / "roc_pr.png")
    labels = figures.curve_legend_labels(frames, CLASSES)
    assert [panel["title"] for panel in panels] == [
        title for name in CLASSES for title in (f"{name} vs rest: ROC", f"{name} vs rest: precision-recall")
    ]
    for row, name in enumerate(CLASSES):
        roc_panel, pr_panel = panels[2 * row], panels[2 * row + 1]
        assert roc_panel["legend"] == [labels[name][model][0] for model in frames]
        assert pr_panel["legend"] == [labels[name][model][1] for model in frames]
        assert roc_panel["lines"] == pr_panel["lines"] == len(frames) + 1  # one per model and the chance line
        assert roc_panel["limits"] == pr_panel["limits"] == ((-0.01, 1.01), (-0.01, 1.01))


def test_roc_pr_png_leaves_out_a_class_with_no_positives(frames, tmp_path, monkeypatch):
    panels = drawn_panels(monkeypatch)
    without_covid = {model: frame[frame["label"] != "COVID19"] for model, frame in frames.items()}
    figures.roc_pr_png(without_covid, CLASSES, tmp_path / "roc_pr.png")
    assert [panel["title"] for panel in panels][::2] == ["NORMAL vs rest: ROC", "PNEUMONIA vs rest: ROC"]
    assert all(panel["legend"] and "n/a" not in " ".join(panel["legend"]) for panel in panels)


def test_calibration_table_lists_the_non_empty_reliability_bins(frames):
    table = figures.calibration_table(frames, CLASSES, n_bins=10)
    assert list(table.columns) == ["model", "confidence", "accuracy", "count"]
    assert list(table["model"].unique()) == list(frames)
    for model, frame in frames.items():
        probs = frame[[f"prob_{name}" for name in CLASSES]].to_numpy()
        bins = stats.reliability_bins(probs, stats.encode_labels(frame["label"], CLASSES), 10)
        filled = bins["count"] > 0
        rows = table[table["model"] == model]
        assert rows["count"].tolist() == bins["count"][filled].tolist()
        assert rows["count"].sum() == len(frame)
        assert np.allclose(rows["confidence"], bins["confidence"][filled], atol=1e-5)
        assert np.allclose(rows["accuracy"], bins["accuracy"][filled], atol=1e-5)


def test_legend_labels_mark_an_unscorable_class(frames):
    without_covid = frames["custom"][frames["custom"]["label"] != "COVID19"]
    roc_label, pr_label = figures.curve_legend_labels({"custom": without_covid}, CLASSES)["COVID19"]["custom"]
    assert (roc_label, pr_label) == ("custom (AUC n/a)", "custom (AP n/a)")


def test_reliability_title_shows_ece_before_and_after():
    assert figures.reliability_title("custom", 0.12345) == "custom: ECE 0.123"
    assert figures.reliability_title("custom", 0.12345, 0.04) == "custom: ECE 0.123 → 0.040"


def test_reliability_png_rejects_calibration_for_an_unknown_model(frames, tmp_path):
    with pytest.raises(ValueError, match="resnet"):
        figures.reliability_png(frames, CLASSES, tmp_path / "r.png", calibrated={"resnet": calibrated_probs(frames["custom"])})
    assert not (tmp_path / "r.png").exists()


def test_missing_probability_column_is_a_pipeline_error(frames, tmp_path):
    broken = frames["custom"].drop(columns="prob_NORMAL")
    with pytest.raises(PipelineError, match="prob_NORMAL"):
        figures.roc_pr_png({"custom": broken}, CLASSES, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
