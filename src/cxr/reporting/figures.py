"""Figures and plot tables that show how the models compare beyond one accuracy number.

A confusion matrix shows which classes get mixed up, ROC and precision-recall curves show
the trade-offs at every threshold (the PR curve matters for the small COVID19 class), and a
reliability diagram shows whether a model's stated confidence can be trusted.

Every function takes predictions tables (columns ``path, label, predicted, prob_<class>...``
as written by the evaluate stage). PNGs are rendered with matplotlib's Agg backend at a
fixed dpi and without the software/date metadata, so the same predictions give
byte-identical files and DVC does not see a change where there is none. The curve tables
are long-format frames that the caller writes as CSV for ``dvc plots show``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import average_precision_score, confusion_matrix, precision_recall_curve, roc_curve  # noqa: E402

from cxr.errors import PipelineError  # noqa: E402
from cxr.evaluation.predictions import probabilities_of  # noqa: E402
from cxr.reporting.stats import encode_labels, expected_calibration_error, reliability_bins, roc_auc_per_class  # noqa: E402

DPI = 100
CURVE_DECIMALS = 5
ROC_COLUMNS = ["model", "class", "fpr", "tpr"]
PR_COLUMNS = ["model", "class", "recall", "precision"]
# PNG text chunks matplotlib would add; "Software" carries the matplotlib version.
_PNG_METADATA = {"Software": None}


def _true_indices(frame: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    return encode_labels(frame["label"].tolist(), classes)


def _defined_classes(y_true: np.ndarray, classes: Sequence[str]) -> Iterator[tuple[int, str]]:
    """Classes with both positives and negatives: one-vs-rest curves are undefined for the others."""
    for index, name in enumerate(classes):
        is_class = y_true == index
        if is_class.any() and not is_class.all():
            yield index, name


# ---------------------------------------------------------------------------------------
# Saving figures
# ---------------------------------------------------------------------------------------


@contextmanager
def _figure(path: Path, n_rows: int, n_cols: int, size: tuple[float, float]) -> Iterator[tuple[Figure, np.ndarray]]:
    """A figure whose axes grid is always 2-D; saved to ``path`` and closed on exit, closed even on error."""
    figure, axes = plt.subplots(n_rows, n_cols, figsize=size, squeeze=False, layout="constrained")
    try:
        yield figure, axes
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=DPI, format="png", metadata=_PNG_METADATA)
    finally:
        plt.close(figure)


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
    with _figure(path, 1, 1, (side, side * 0.85)) as (figure, axes):
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
    return table.round({column: CURVE_DECIMALS for column in columns[2:]})


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

    ROC AUC comes from :func:`cxr.reporting.stats.roc_auc_per_class` so the figure quotes the same
    number as the metrics files; "n/a" marks a class the table cannot score.
    """
    labels: dict[str, dict[str, tuple[str, str]]] = {name: {} for name in classes}
    for model, frame in frames.items():
        probs = probabilities_of(frame, classes)
        y_true = _true_indices(frame, classes)
        aucs = roc_auc_per_class(y_true, probs, classes)
        for index, name in enumerate(classes):
            is_class = y_true == index
            defined = is_class.any() and not is_class.all()
            average_precision = float(average_precision_score(is_class, probs[:, index])) if defined else float("nan")
            labels[name][model] = (
                f"{model} (AUC {_format_score(aucs[name])})",
                f"{model} (AP {_format_score(average_precision)})",
            )
    return labels


def _style_roc_axes(ax: Axes, class_name: str) -> None:
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{class_name} vs rest: ROC")
    ax.legend(loc="lower right", fontsize="small")


def _style_pr_axes(ax: Axes, class_name: str, prevalence: float) -> None:
    ax.axhline(prevalence, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{class_name} vs rest: precision-recall")
    ax.legend(loc="lower left", fontsize="small")


def roc_pr_png(frames: Mapping[str, pd.DataFrame], classes: Sequence[str], path: Path) -> None:
    """One row per class, ROC on the left and precision-recall on the right, one line per model.

    The legend gives each model's AUC (ROC) or average precision (PR); the dotted line is
    chance (the diagonal for ROC, the class prevalence of the first table for PR).
    """
    roc, pr = roc_pr_curves(frames, classes)
    labels = curve_legend_labels(frames, classes)
    first_frame = next(iter(frames.values()))
    with _figure(path, len(classes), 2, (11.0, 4.2 * len(classes))) as (_, axes):
        for row, name in enumerate(classes):
            roc_ax, pr_ax = axes[row]
            for color_index, model in enumerate(frames):
                color = f"C{color_index}"
                roc_label, pr_label = labels[name][model]
                roc_rows = roc[(roc["model"] == model) & (roc["class"] == name)]
                pr_rows = pr[(pr["model"] == model) & (pr["class"] == name)]
                roc_ax.plot(roc_rows["fpr"], roc_rows["tpr"], color=color, label=roc_label)
                pr_ax.step(pr_rows["recall"], pr_rows["precision"], where="post", color=color, label=pr_label)
            _style_roc_axes(roc_ax, name)
            _style_pr_axes(pr_ax, name, float((first_frame["label"] == name).mean()))


# ---------------------------------------------------------------------------------------
# Reliability diagram
# ---------------------------------------------------------------------------------------


def reliability_title(model: str, ece: float, calibrated_ece: float | None = None) -> str:
    """Panel title: the model and its ECE, as "before → after" when calibrated probabilities are shown."""
    if calibrated_ece is None:
        return f"{model}: ECE {ece:.3f}"
    return f"{model}: ECE {ece:.3f} → {calibrated_ece:.3f}"


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
    ``n_bins`` bins (the same number :func:`cxr.reporting.stats.expected_calibration_error` reports).
    ``calibrated`` maps a model name to its (N, classes) probabilities after calibration
    (e.g. temperature scaling), row-aligned with that model's table; those models get a
    second line and an "ECE before → after" title.
    """
    calibrated = calibrated or {}
    unknown = sorted(set(calibrated) - set(frames))
    if unknown:
        raise ValueError(f"calibrated probabilities for unknown model(s) {unknown}; models are {list(frames)}")
    with _figure(path, 1, len(frames), (4.2 * len(frames), 4.4)) as (_, axes):
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
