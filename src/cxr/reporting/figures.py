"""Figures and plot tables that show how the models compare beyond one accuracy number.

A confusion matrix shows which classes get mixed up, ROC and precision-recall curves show
the trade-offs at every threshold (the PR curve matters for the small COVID19 class), and a
reliability diagram shows whether a model's stated confidence can be trusted.

Every function takes predictions tables (columns ``path, label, predicted, prob_<class>...``
as written by the evaluate stage). PNGs are rendered with matplotlib's Agg backend at a
fixed dpi and written by :mod:`cxr.reporting.pngs`, so the same predictions give
byte-identical files and DVC does not see a change where there is none. ROC and PR curves
are drawn by scikit-learn's displays, the tested implementation, rather than by hand. The
curve and calibration tables are long-format frames that the caller writes as CSV for
``dvc plots show`` and ``dvc plots diff``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402  (backend must be chosen first)
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    PrecisionRecallDisplay,
    RocCurveDisplay,
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    roc_curve,
)

from cxr import paths  # noqa: E402
from cxr.errors import PipelineError  # noqa: E402
from cxr.evaluation.predictions import probabilities_of  # noqa: E402
from cxr.files import atomic_write  # noqa: E402
from cxr.reporting.pngs import png_figure  # noqa: E402
from cxr.stats import encode_labels, expected_calibration_error, reliability_bins, roc_auc_per_class  # noqa: E402

DPI = 100
CURVE_DECIMALS = 5
ROC_COLUMNS = ["model", "class", "fpr", "tpr"]
PR_COLUMNS = ["model", "class", "recall", "precision"]
CALIBRATION_COLUMNS = ["model", "confidence", "accuracy", "count"]


def _true_indices(frame: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    return encode_labels(frame["label"].tolist(), classes)


def _scored(frames: Mapping[str, pd.DataFrame], classes: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(true class indices, probabilities) per model: the checked, decoded form every figure and table works on."""
    return {model: (_true_indices(frame, classes), probabilities_of(frame, classes)) for model, frame in frames.items()}


def _has_curve(is_class: np.ndarray) -> bool:
    """Both positives and negatives: a one-vs-rest curve (and its AUC or AP) is undefined otherwise."""
    return bool(is_class.any() and not is_class.all())


def _defined_classes(y_true: np.ndarray, classes: Sequence[str]) -> Iterator[tuple[int, str]]:
    """The classes of a table that have a one-vs-rest curve, with their indices."""
    for index, name in enumerate(classes):
        if _has_curve(y_true == index):
            yield index, name


# ---------------------------------------------------------------------------------------
# Confusion matrix
# ---------------------------------------------------------------------------------------


def confusion_counts(frame: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """counts[i, j] = images of true class i predicted as class j, in class order."""
    for column in ("label", "predicted"):
        if column not in frame.columns:
            raise PipelineError(f"predictions table lacks column {column!r}; has {list(frame.columns)}")
    true = encode_labels(frame["label"].tolist(), classes)
    predicted = encode_labels(frame["predicted"].tolist(), classes)
    return confusion_matrix(true, predicted, labels=list(range(len(classes))))


def _row_fractions(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its total (the per-class recall spread); 0 for a class with no images."""
    totals = counts.sum(axis=1, keepdims=True).astype(float)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)


def confusion_png(frame: pd.DataFrame, classes: Sequence[str], title: str, path: Path) -> None:
    """Confusion matrix, true class on rows and predicted on columns.

    Each cell shows the image count (what a reader checks against the test-set size) with
    the row percentage underneath; the shading follows the row percentage so a rare class
    such as COVID19 is as readable as a common one.
    """
    counts = confusion_counts(frame, classes)
    fractions = _row_fractions(counts)
    side = 1.4 * len(classes) + 2.0
    with png_figure(path, DPI, figsize=(side, side * 0.85), layout="constrained") as (figure, axes):
        ax = axes[0, 0]
        image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
        for i, j in np.ndindex(counts.shape):
            color = "white" if fractions[i, j] > 0.5 else "black"
            ax.text(j, i - 0.08, f"{counts[i, j]}", ha="center", va="center", color=color, fontsize=13)
            ax.text(j, i + 0.22, f"{100 * fractions[i, j]:.1f}%", ha="center", va="center", color=color, fontsize=8)
        ticks = np.arange(len(classes))
        ax.set_xticks(ticks, labels=list(classes))
        ax.set_yticks(ticks, labels=list(classes))
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title)
        figure.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")


# ---------------------------------------------------------------------------------------
# ROC and precision-recall curves
# ---------------------------------------------------------------------------------------


def _one_model_curves(model: str, frame: pd.DataFrame, classes: Sequence[str]) -> tuple[list[pd.DataFrame], list[pd.DataFrame]]:
    probs = probabilities_of(frame, classes)
    y_true = _true_indices(frame, classes)
    roc_parts, pr_parts = [], []
    for index, name in _defined_classes(y_true, classes):
        is_class = y_true == index
        fpr, tpr, _ = roc_curve(is_class, probs[:, index], drop_intermediate=True)
        precision, recall, _ = precision_recall_curve(is_class, probs[:, index], drop_intermediate=True)
        roc_parts.append(pd.DataFrame({"model": model, "class": name, "fpr": fpr, "tpr": tpr}))
        pr_parts.append(pd.DataFrame({"model": model, "class": name, "recall": recall, "precision": precision}))
    return roc_parts, pr_parts


def _concat_rounded(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame(columns=columns)
    table = pd.concat(parts, ignore_index=True)[columns]
    return table.round({column: CURVE_DECIMALS for column in columns if table[column].dtype.kind == "f"})


def roc_pr_curves(frames: Mapping[str, pd.DataFrame], classes: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long-format one-vs-rest ROC (``model, class, fpr, tpr``) and PR (``model, class, recall, precision``) tables.

    One block of rows per (model, class), in input and class order. ROC rows run from
    (0, 0) to (1, 1) with fpr non-decreasing; PR rows follow scikit-learn (recall falling
    to 0, where precision is 1). Points on straight segments are dropped and values are
    rounded to 5 decimals so the CSVs stay small and diff cleanly. A class with no
    positives or no negatives in a table has no curve and is left out.
    """
    roc_parts: list[pd.DataFrame] = []
    pr_parts: list[pd.DataFrame] = []
    for model, frame in frames.items():
        model_roc, model_pr = _one_model_curves(model, frame, classes)
        roc_parts += model_roc
        pr_parts += model_pr
    return _concat_rounded(roc_parts, ROC_COLUMNS), _concat_rounded(pr_parts, PR_COLUMNS)


def _format_score(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def curve_legend_labels(frames: Mapping[str, pd.DataFrame], classes: Sequence[str]) -> dict[str, dict[str, tuple[str, str]]]:
    """Legend text per class and model: (ROC label with its AUC, PR label with its average precision).

    ROC AUC comes from :func:`cxr.stats.roc_auc_per_class` so the figure quotes the same
    number as the metrics files; "n/a" marks a class the table cannot score.
    """
    labels: dict[str, dict[str, tuple[str, str]]] = {name: {} for name in classes}
    for model, (y_true, probs) in _scored(frames, classes).items():
        aucs = roc_auc_per_class(y_true, probs, classes)
        for index, name in enumerate(classes):
            is_class = y_true == index
            defined = _has_curve(is_class)
            average_precision = float(average_precision_score(is_class, probs[:, index])) if defined else float("nan")
            labels[name][model] = (
                f"{model} (AUC {_format_score(aucs[name])})",
                f"{model} (AP {_format_score(average_precision)})",
            )
    return labels


def _style_curve_axes(ax: Axes, labels: tuple[str, str], title: str, legend_loc: str) -> None:
    """Limits, labels, title and legend of a ROC or PR panel; the panel fills its grid cell (scikit-learn makes it square)."""
    ax.set_aspect("auto")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.legend(loc=legend_loc, fontsize="small")


def _style_roc_axes(ax: Axes, class_name: str) -> None:
    """The chance diagonal, then the shared styling."""
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    _style_curve_axes(ax, ("false positive rate", "true positive rate"), f"{class_name} vs rest: ROC", "lower right")


def _style_pr_axes(ax: Axes, class_name: str, prevalence: float) -> None:
    """The chance line at the class prevalence, then the shared styling."""
    ax.axhline(prevalence, color="grey", linestyle=":", linewidth=1)
    _style_curve_axes(ax, ("recall", "precision"), f"{class_name} vs rest: precision-recall", "lower left")


def _draw_class_curves(
    roc_ax: Axes, pr_ax: Axes, scored: Mapping[str, tuple[np.ndarray, np.ndarray]], index: int,
    labels: Mapping[str, tuple[str, str]],
) -> None:
    """One model per colour, drawn by scikit-learn; a model whose table cannot score this class is skipped.

    The label is passed in full so the legend quotes :func:`curve_legend_labels` (the metrics
    files' AUC, 3 decimals) instead of scikit-learn's own "(AUC = 0.xx)" suffix.
    """
    for color_index, (model, (y_true, probs)) in enumerate(scored.items()):
        is_class = y_true == index
        if not _has_curve(is_class):
            continue
        roc_label, pr_label = labels[model]
        color = f"C{color_index}"
        RocCurveDisplay.from_predictions(is_class, probs[:, index], pos_label=True, ax=roc_ax,
                                         curve_kwargs={"color": color, "label": roc_label})
        PrecisionRecallDisplay.from_predictions(is_class, probs[:, index], pos_label=True, ax=pr_ax,
                                                curve_kwargs={"color": color, "label": pr_label})


def roc_pr_png(frames: Mapping[str, pd.DataFrame], classes: Sequence[str], path: Path) -> None:
    """One row per class, ROC on the left and precision-recall on the right, one line per model.

    The legend gives each model's AUC (ROC) or average precision (PR); the dotted line is
    chance (the diagonal for ROC, the class prevalence of the first table for PR). A class
    no table can score (no positives or no negatives) gets no row; if that is every class,
    there is nothing to draw and it is an error.
    """
    labels = curve_legend_labels(frames, classes)
    scored = _scored(frames, classes)
    rows = [
        (index, name) for index, name in enumerate(classes)
        if any(_has_curve(y_true == index) for y_true, _ in scored.values())
    ]
    if not rows:
        raise PipelineError(f"no class in {list(classes)} has both positives and negatives in any predictions table")
    first_true = next(iter(scored.values()))[0]
    with png_figure(path, DPI, len(rows), 2, figsize=(11.0, 4.2 * len(rows)), layout="constrained") as (_, axes):
        for (roc_ax, pr_ax), (index, name) in zip(axes, rows):
            _draw_class_curves(roc_ax, pr_ax, scored, index, labels[name])
            _style_roc_axes(roc_ax, name)
            _style_pr_axes(pr_ax, name, float((first_true == index).mean()))


# ---------------------------------------------------------------------------------------
# Reliability diagram
# ---------------------------------------------------------------------------------------


def reliability_title(model: str, ece: float, calibrated_ece: float | None = None) -> str:
    """Panel title: the model and its ECE, as "before → after" when calibrated probabilities are shown."""
    if calibrated_ece is None:
        return f"{model}: ECE {ece:.3f}"
    return f"{model}: ECE {ece:.3f} → {calibrated_ece:.3f}"


def calibration_table(frames: Mapping[str, pd.DataFrame], classes: Sequence[str], n_bins: int = 15) -> pd.DataFrame:
    """Long-format reliability bins (``model, confidence, accuracy, count``) for ``dvc plots``.

    One row per non-empty bin of :func:`cxr.stats.reliability_bins`, in input
    order and bin order: the points of the reliability diagram, so experiments can be
    compared with ``dvc plots diff``. Confidence and accuracy are rounded to 5 decimals
    so the CSV diffs cleanly.
    """
    parts = []
    for model, (y_true, probs) in _scored(frames, classes).items():
        bins = reliability_bins(probs, y_true, n_bins)
        filled = bins["count"] > 0
        parts.append(pd.DataFrame({
            "model": model,
            "confidence": bins["confidence"][filled],
            "accuracy": bins["accuracy"][filled],
            "count": bins["count"][filled],
        }))
    return _concat_rounded(parts, CALIBRATION_COLUMNS)


def _plot_reliability(ax: Axes, probs: np.ndarray, y_true: np.ndarray, n_bins: int, label: str, color: str) -> None:
    """Mean confidence against accuracy for each non-empty bin, marker area growing with the bin's share of images.

    The marker size keeps a bin holding two images from looking as trustworthy as one holding hundreds.
    """
    bins = reliability_bins(probs, y_true, n_bins)
    filled = bins["count"] > 0
    share = bins["count"][filled] / bins["count"].sum()
    ax.plot(bins["confidence"][filled], bins["accuracy"][filled], color=color, linewidth=1.2, label=label)
    ax.scatter(bins["confidence"][filled], bins["accuracy"][filled], s=8 + 250 * share, color=color, zorder=3)


def reliability_png(
    frames: Mapping[str, pd.DataFrame],
    classes: Sequence[str],
    path: Path,
    n_bins: int = 15,
    calibrated: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Reliability diagram, one panel per model: top-label confidence against accuracy per bin.

    Points below the diagonal mean over-confidence. Each title gives the ECE with
    ``n_bins`` bins (the same number :func:`cxr.stats.expected_calibration_error` reports).
    ``calibrated`` maps a model name to its (N, classes) probabilities after calibration
    (e.g. temperature scaling), row-aligned with that model's table; those models get a
    second line and an "ECE before → after" title.
    """
    calibrated = calibrated or {}
    unknown = sorted(set(calibrated) - set(frames))
    if unknown:
        raise ValueError(f"calibrated probabilities for unknown model(s) {unknown}; models are {list(frames)}")
    with png_figure(path, DPI, 1, len(frames), figsize=(4.2 * len(frames), 4.4), layout="constrained") as (_, axes):
        for ax, (model, frame) in zip(axes[0], frames.items()):
            probs = probabilities_of(frame, classes)
            y_true = _true_indices(frame, classes)
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
            _plot_reliability(ax, probs, y_true, n_bins, "as predicted", "C0")
            calibrated_ece = None
            if model in calibrated:
                _plot_reliability(ax, calibrated[model], y_true, n_bins, "calibrated", "C1")
                calibrated_ece = expected_calibration_error(calibrated[model], y_true, n_bins)
            ax.set_title(reliability_title(model, expected_calibration_error(probs, y_true, n_bins), calibrated_ece))
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            ax.set_aspect("equal")
            ax.set_xlabel("mean confidence in bin")
            ax.set_ylabel("accuracy in bin")
            ax.legend(loc="upper left", fontsize="small")


def write_curve_tables(test: Mapping[str, pd.DataFrame], classes: Sequence[str], n_bins: int) -> None:
    """ROC, PR and reliability points as CSVs under ``plots/curves/``, for ``dvc plots show`` and ``diff``.

    One file per line to draw (ROC and PR per class and model, calibration per model), since
    a DVC plot definition draws a file as one line and cannot split it by a column. Every file
    is written, header-only where a class has no curve, so the set ``dvc.yaml`` lists is complete.
    PR rows are written in increasing recall: a Vega line joins points in x order (ties kept in
    file order), so that order traces the curve, where scikit-learn's falling recall would zigzag.
    """
    roc, pr = roc_pr_curves(test, classes)
    calibration = calibration_table(test, classes, n_bins)
    tables = {}
    for model in test:
        tables[paths.calibration_file(model)] = calibration[calibration["model"] == model]
        for name in classes:
            tables[paths.roc_curve_file(name, model)] = roc[(roc["model"] == model) & (roc["class"] == name)]
            tables[paths.pr_curve_file(name, model)] = pr[(pr["model"] == model) & (pr["class"] == name)].iloc[::-1]
    for path, table in tables.items():
        atomic_write(path, lambda tmp, table=table: table.to_csv(tmp, index=False))
