"""The soft-voting ensemble: its weights from validation predictions and its predictions table.

The ensemble is scored like any model, so its predictions are built here, beside the tables
the models' evaluation writes: the compare stage, the external stage and the reports all use
these two functions, and the ensemble is the same everywhere. Torch-free, on predictions tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from cxr import stats
from cxr.errors import PipelineError
from cxr.evaluation.predictions import predictions_frame, probabilities_of


def ensemble_weights(val_frames: Mapping[str, pd.DataFrame], classes: Sequence[str], mode: str) -> dict[str, float]:
    """Soft-voting weights: equal, or proportional to each model's validation macro-F1 (never test)."""
    if mode == "equal":
        return {name: 1 / len(val_frames) for name in val_frames}
    f1 = stats.macro_f1(len(classes))
    scores = {
        name: f1(stats.encode_labels(frame["label"], classes), stats.encode_labels(frame["predicted"], classes))
        for name, frame in val_frames.items()
    }
    total = sum(scores.values())
    if total <= 0:
        raise PipelineError("cannot weight the ensemble by validation macro-F1: every model scored 0")
    return {name: score / total for name, score in scores.items()}


def ensemble_frame(frames: Mapping[str, pd.DataFrame], classes: Sequence[str], weights: Mapping[str, float]) -> pd.DataFrame:
    """Weighted average of the models' probabilities, as a predictions table of its own."""
    reference = next(iter(frames.values()))
    for name, frame in frames.items():
        if not frame["path"].equals(reference["path"]):
            raise PipelineError(f"predictions of {name} cover other images than the rest; rerun its evaluation")
    probabilities = sum(weights[name] * probabilities_of(frame, classes) for name, frame in frames.items())
    labels = stats.encode_labels(reference["label"], classes)
    return predictions_frame(reference["path"], labels, probabilities, classes)
