"""A trained model's predictions on a split, as the evaluate stage writes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxr.data.preprocess import load_split
from cxr.errors import PipelineError
from cxr.evaluation.predictions import predictions_frame
from cxr.training.engine import evaluate, iterate_batches
from cxr.training.models import load_checkpoint, model_from_checkpoint


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
        iterate_batches(images, torch.from_numpy(labels), batch_size),
        len(labels),
        nn.CrossEntropyLoss(),
        device,
        memory_format=memory_format,
        desc=f"{checkpoint['approach']} {split}",
    )
    return SplitPredictions(images, predictions_frame(rows["path"], labels, result.probabilities, classes))
