"""The results table (as in the reference write-up) and its bar chart."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import pandas as pd  # noqa: E402

MODEL_NAMES = {
    "custom": "Custom CNN",
    "extract": "Feature extraction (ResNet-18)",
    "finetune": "Fine-tuning (ResNet-18)",
}
COLUMNS = {
    "accuracy": "Accuracy",
    "precision_macro": "Precision (Macro)",
    "recall_macro": "Recall (Macro)",
    "f1_macro": "F1-Score (Macro)",
}


def summary_table(metrics: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per approach with the four headline scores, in the reference's column order."""
    rows = [
        {"Model": MODEL_NAMES.get(name, name), **{title: scores[key] for key, title in COLUMNS.items()}}
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
    """Grouped bars: one group per score, one bar per model."""
    scores = table.set_index("Model")[list(COLUMNS.values())].T
    axes = scores.plot.bar(figsize=(9, 4.5), rot=0, width=0.8)
    low = max(0.0, float(scores.min().min()) - 0.05)
    axes.set_ylim(low, 1.0)
    axes.set_ylabel("score on the test split")
    axes.set_title("Chest X-ray classification: test-set comparison")
    axes.legend(loc="lower right", fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes.figure.tight_layout()
    axes.figure.savefig(path, dpi=120)
    plt.close(axes.figure)
