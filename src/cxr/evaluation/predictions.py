"""The predictions table (one row per test image) that evaluation writes and every report reads.

Torch-free on purpose: plotting and statistics read these tables without loading a model stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxr.errors import PipelineError

PROB_PREFIX = "prob_"


def predictions_frame(
    paths: Sequence[str], labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]
) -> pd.DataFrame:
    """One row per image: path, true and predicted class, and each class's probability."""
    frame = pd.DataFrame({"path": list(paths), "label": np.asarray(classes)[labels]})
    frame["predicted"] = np.asarray(classes)[probabilities.argmax(axis=1)]
    for index, name in enumerate(classes):
        frame[f"{PROB_PREFIX}{name}"] = probabilities[:, index].round(6)
    return frame


def probabilities_of(frame: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """The ``prob_<class>`` columns as an (N, classes) array, in class order."""
    columns = [f"{PROB_PREFIX}{name}" for name in classes]
    missing = [column for column in [*columns, "label"] if column not in frame.columns]
    if missing:
        raise PipelineError(f"predictions table lacks column(s) {missing}; has {list(frame.columns)}")
    if frame.empty:
        raise PipelineError("predictions table has no rows")
    return frame[columns].to_numpy(np.float64)
