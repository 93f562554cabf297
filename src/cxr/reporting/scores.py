"""The headline scores of one model on one split, from its predicted and true labels (scikit-learn).

Torch-free: the compare stage recomputes the table from the predictions CSVs alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def classification_metrics(true: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix (scikit-learn)."""
    classes = list(classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        true, predicted, labels=classes, zero_division=0
    )
    return {
        "accuracy": round(float(accuracy_score(true, predicted)), 6),
        "precision_macro": round(float(precision.mean()), 6),
        "recall_macro": round(float(recall.mean()), 6),
        "f1_macro": round(float(f1.mean()), 6),
        "per_class": {
            name: {
                "precision": round(float(precision[i]), 6),
                "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": {
            "labels": classes,
            "rows_true_columns_predicted": confusion_matrix(true, predicted, labels=classes).tolist(),
        },
    }
