"""The results table (as in the reference write-up), its uncertainty, its bar chart and the report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cxr.approaches import DISPLAY_NAMES
from cxr.reporting.pngs import png_figure

BAR_CHART_DPI = 120
COLUMNS = {
    "accuracy": "Accuracy",
    "precision_macro": "Precision (Macro)",
    "recall_macro": "Recall (Macro)",
    "f1_macro": "F1-Score (Macro)",
}


def summary_table(metrics: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per approach with the four headline scores, in the reference's column order."""
    rows = [
        {"Model": DISPLAY_NAMES.get(name, name), **{title: scores[key] for key, title in COLUMNS.items()}}
        for name, scores in metrics.items()
    ]
    return pd.DataFrame(rows, columns=["Model", *COLUMNS.values()])


def to_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A Markdown table with the best row (highest macro-F1) in bold."""
    best = int(table["F1-Score (Macro)"].idxmax())
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join(["---"] + ["---:"] * (len(table.columns) - 1)) + "|"
    lines = [header, rule]
    for index, row in table.iterrows():
        cells = [str(row["Model"])] + [f"{row[c]:.{digits}f}" for c in table.columns[1:]]
        if index == best:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars: one group per score, one bar per model (a reproducible PNG, see :mod:`cxr.reporting.pngs`)."""
    scores = table.set_index("Model")[list(COLUMNS.values())].T
    with png_figure(path, BAR_CHART_DPI, figsize=(9, 4.5)) as (figure, axes):
        ax = scores.plot.bar(ax=axes[0, 0], rot=0, width=0.8)
        low = max(0.0, float(scores.min().min()) - 0.05)
        ax.set_ylim(low, 1.0)
        ax.set_ylabel("score on the test split")
        ax.set_title("Chest X-ray classification: test-set comparison")
        ax.legend(loc="lower right", fontsize="small")
        ax.grid(axis="y", alpha=0.3)
        figure.tight_layout()


def _ci(entry: Mapping[str, float]) -> str:
    return f"{entry['value']:.4f} [{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]"


def uncertainty_markdown(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """Accuracy and macro-F1 with 95% intervals, macro AUC and calibration, one row per model."""
    lines = [
        "| Model | Accuracy [95% CI] | F1-Score (Macro) [95% CI] | ROC AUC (macro) | ECE | ECE after temperature scaling |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, report in reports.items():
        calibration = report.get("calibration")
        after = f"{calibration['ece_after']:.4f} (T = {calibration['temperature']:.2f})" if calibration else "-"
        lines.append(
            f"| {DISPLAY_NAMES.get(name, name)} | {_ci(report['accuracy'])} | {_ci(report['f1_macro'])} | "
            f"{report['roc_auc']['macro']:.4f} | {report['ece']:.4f} | {after} |"
        )
    return "\n".join(lines) + "\n"


def per_class_markdown(reports: Mapping[str, Mapping[str, Any]], classes: Sequence[str]) -> str:
    """Sensitivity (recall) and PPV (precision) per class with 95% intervals, and one-vs-rest AUC."""
    lines = ["| Model | Class | Sensitivity [95% CI] | PPV [95% CI] | ROC AUC |", "|---|---|---|---|---:|"]
    for name, report in reports.items():
        for label in classes:
            scores = report["per_class"][label]
            lines.append(
                f"| {DISPLAY_NAMES.get(name, name)} | {label} | {_ci(scores['sensitivity'])} | {_ci(scores['ppv'])} | "
                f"{report['roc_auc'][label]:.4f} |"
            )
    return "\n".join(lines) + "\n"


def summary_markdown(
    table: pd.DataFrame, reports: Mapping[str, Mapping[str, Any]], sentences: Sequence[str],
    weights: Mapping[str, float], classes: Sequence[str], resamples: int, tta: Sequence[str] = (),
) -> str:
    """The whole comparison in Markdown: headline table, intervals, per-class scores, significance.

    ``tta`` names the approaches scored with test-time augmentation, which the table must say.
    """
    weight_text = ", ".join(f"{DISPLAY_NAMES[name]} {weight:.3f}" for name, weight in weights.items())
    tta_text = (f"Scored with test-time augmentation (probabilities averaged over rotated and zoomed views of each "
                f"image, `evaluate.tta`): {', '.join(DISPLAY_NAMES[name] for name in tta)}.\n" if tta else "")
    return "\n".join([
        to_markdown(table),
        f"{tta_text}95% confidence intervals: stratified bootstrap, {resamples} resamples of the test set.\n",
        uncertainty_markdown(reports),
        per_class_markdown(reports, classes),
        "Paired comparison on the same test images (exact McNemar test, Holm-corrected across all pairs):\n",
        *[f"- {sentence}" for sentence in sentences],
        "",
        f"Ensemble: average of the three models' probabilities, weights {weight_text}.",
        "",
    ])


def report_markdown(summary: str, approaches: Sequence[str]) -> str:
    """``reports/report.md``: the summary plus every figure, readable without DVC."""
    galleries = []
    for name in approaches:
        galleries += [
            f"### {DISPLAY_NAMES[name]}",
            "",
            f"![confusion matrix](../plots/evaluate/{name}/confusion.png)",
            "",
            f"![Grad-CAM gallery](../plots/evaluate/{name}/gradcam.png)",
            "",
            f"Misclassified test images: [`misclassified/{name}.csv`](misclassified/{name}.csv).",
            "",
        ]
    return "\n".join([
        "# Chest X-ray classification: results",
        "",
        summary,
        "## Figures",
        "",
        "![comparison](../plots/compare.png)",
        "",
        "![ROC and precision-recall curves](../plots/roc_pr.png)",
        "",
        "![reliability diagrams](../plots/reliability.png)",
        "",
        "![shortcut audit](../plots/shortcuts.png)",
        "",
        "![ensemble confusion matrix](../plots/evaluate/ensemble/confusion.png)",
        "",
        "## Per model: confusion matrix and Grad-CAM (last convolutional block)",
        "",
        *galleries,
        "Learning curves: `dvc plots show` (from `plots/<approach>/`).",
        "",
    ])
