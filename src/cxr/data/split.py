"""Index the raw images and split ``Data/train`` into train and validation by patient.

Kermany-style file names carry a patient id (``person123_bacteria_456.jpeg``); images of
one patient must stay in one split or validation scores leak. Files without an id form
their own group. ``Data/test`` is indexed as it is and never re-split.

Images can be left out of train and validation (``leave_out``): the split stage passes the
``Data/train`` images of ``split.unseen_groups`` (see :mod:`cxr.data.groups`), so their test
images measure a collection the model never saw.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from cxr.data.candidates import is_candidate_image
from cxr.errors import PipelineError

PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),  # person123_bacteria_456.jpeg
    re.compile(r"^((?:normal2-)?im-\d+)-", re.IGNORECASE),  # IM-0117-0001.jpeg, NORMAL2-IM-1345-0001-0002.jpeg
)
SPLIT_NAMES = ("train", "val", "test")


def patient_id(file_name: str) -> str:
    """The patient a file belongs to when the name carries it (Kermany names), else the file itself."""
    for pattern in PATIENT_PATTERNS:
        match = pattern.match(file_name)
        if match:
            return match.group(1).lower()
    return Path(file_name).stem


def index_split(root: Path, split: str, classes: Sequence[str]) -> pd.DataFrame:
    """List a split's candidate images as ``path`` (relative to ``root``), ``label``, ``patient``."""
    rows = []
    for label in classes:
        class_dir = root / split / label
        if not class_dir.is_dir():
            raise PipelineError(f"{class_dir}: missing class folder {label}/")
        for path in sorted(class_dir.iterdir()):
            if path.is_file() and is_candidate_image(path):
                rows.append({"path": path.relative_to(root).as_posix(), "label": label, "patient": patient_id(path.name)})
    frame = pd.DataFrame(rows, columns=["path", "label", "patient"])
    missing = sorted(set(classes) - set(frame["label"]))
    if missing:
        raise PipelineError(f"{root / split}: no images of class {missing[0]}")
    return frame


def split_train_val(frame: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified, patient-grouped train/validation split.

    ``StratifiedGroupKFold`` with ``round(1 / val_fraction)`` folds keeps class ratios close
    while never splitting a patient; the first fold is the validation set.
    """
    n_splits = max(2, round(1 / val_fraction))
    smallest = int(frame.groupby("label")["patient"].nunique().min())
    if smallest < n_splits:
        raise PipelineError(
            f"split.val_fraction={val_fraction} needs at least {n_splits} patients per class; the smallest class has {smallest}"
        )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(folds.split(np.zeros(len(frame)), frame["label"], groups=frame["patient"]))
    return frame.iloc[train_idx].reset_index(drop=True), frame.iloc[val_idx].reset_index(drop=True)


def make_splits(root: Path, classes: Sequence[str], val_fraction: float, seed: int,
                leave_out: Collection[str] = frozenset()) -> dict[str, pd.DataFrame]:
    """Index ``root`` (a Kaggle-layout ``Data`` folder) into train, val and test tables.

    ``leave_out`` names ``Data/train`` images (paths as indexed) that go to neither train nor
    val, before the split, so the remaining images still split at ``val_fraction``; the
    test table is never touched.
    """
    pool = index_split(root, "train", classes)
    kept = pool[~pool["path"].isin(list(leave_out))].reset_index(drop=True)
    train, val = split_train_val(kept, val_fraction, seed)
    return {"train": train, "val": val, "test": index_split(root, "test", classes)}


def class_counts(splits: dict[str, pd.DataFrame], classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """Images per class and split, every class listed even when absent."""
    return {
        name: {label: int((frame["label"] == label).sum()) for label in classes} | {"total": len(frame)}
        for name, frame in splits.items()
    }
