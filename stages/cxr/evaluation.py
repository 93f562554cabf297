"""Test-set predictions and the scores the comparison table is built from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from torch import nn

from cxr.engine import evaluate, iterate_batches
from cxr.errors import PipelineError
from cxr.models import load_checkpoint, model_from_checkpoint
from cxr.predictions import predictions_frame
from cxr.preprocess import load_split

def load_trained_model(
    model_path: Path, classes: Sequence[str], device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[nn.Module, dict[str, Any]]:
    """A checkpoint written by training, checked against the params' classes, in eval mode on ``device``."""
    checkpoint = load_checkpoint(model_path)
    if list(checkpoint["classes"]) != list(classes):
        raise PipelineError(f"{model_path} was trained for classes {checkpoint['classes']}, params list {list(classes)}")
    return model_from_checkpoint(checkpoint, str(model_path)).to(device, memory_format=memory_format), checkpoint


@dataclass
class SplitPredictions:
    """A split's uint8 images and the model's predictions table for them (same row order)."""

    images: np.ndarray
    table: pd.DataFrame


def predict_split(
    model: nn.Module, checkpoint: dict[str, Any], processed_dir: Path, split: str, classes: Sequence[str],
    batch_size: int, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format,
) -> SplitPredictions:
    """Run a trained model over a preprocessed split, its batches in ``memory_format`` (the model's layout)."""
    images, labels, rows = load_split(processed_dir, split, classes)
    if images.shape[-1] != checkpoint["image_size"]:
        raise PipelineError(
            f"the {checkpoint['approach']} model expects {checkpoint['image_size']} px images but {processed_dir} "
            f"holds {images.shape[-1]} px; rerun its training stage"
        )
    result = evaluate(
        model,
        iterate_batches(torch.from_numpy(images), torch.from_numpy(labels), batch_size),
        len(labels),
        nn.CrossEntropyLoss(),
        device,
        memory_format=memory_format,
        desc=f"{checkpoint['approach']} {split}",
    )
    return SplitPredictions(images, predictions_frame(rows["path"], labels, result.probabilities, classes))


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
