"""Does a model read the lungs? Scores with the lung fields hidden, with everything else hidden, and Grad-CAM mass.

COVID-19 radiograph sets mix hospitals and age groups, so a model can score well by
recognising where a film came from (text markers, borders, collimation, body size) instead
of the disease (DeGrave, Janizek & Lee, Nature Machine Intelligence 2021). Three pieces of
evidence tell the two apart, all computed on the test split:

* hiding a centred box that holds the lung fields: a model that reads the lungs falls
  towards chance, one that keeps most of its accuracy decides from outside them;
* hiding everything outside that box: a model that reads the lungs keeps its accuracy;
* the share of its Grad-CAM mass that falls inside the box.

Hidden pixels take one neutral grey (the training images' mean), so the hiding itself adds
no edge the model could read as a class.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr.data.preprocess import load_split, save_split
from cxr.evaluation.saliency import gradcam_heatmaps
from cxr.lung_box import center_box
from cxr.training.engine import evaluate, iterate_batches
from cxr.training.models import Classifier

VIEWS = ("intact", "center_hidden", "border_hidden")


def occluded(images: np.ndarray, view: str, fraction: float, fill: int) -> np.ndarray:
    """A copy of uint8 images (N, H, W) as ``view`` shows them: intact, centre hidden or border hidden."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
    rows, cols = center_box(images.shape[-1], fraction)
    if view == "intact":
        return images.copy()
    if view == "center_hidden":
        hidden = images.copy()
        hidden[:, rows, cols] = fill
        return hidden
    hidden = np.full_like(images, fill)
    hidden[:, rows, cols] = images[:, rows, cols]
    return hidden


def neutral_grey(images: np.ndarray, chunk: int = 1024) -> int:
    """The mean pixel of ``images`` (uint8), computed in chunks: the fill a model has seen most of."""
    total = sum(float(images[start : start + chunk].sum(dtype=np.float64)) for start in range(0, len(images), chunk))
    return int(round(total / max(1, images.size)))


def write_probe_splits(processed: Path, probe: Path, classes: Sequence[str], fraction: float,
                       splits: Sequence[str] = ("train", "val", "test")) -> int:
    """Write the border probe's data: each split of ``processed`` with its lung box hidden, under ``probe``.

    The box takes the training split's :func:`neutral_grey`, the fill the shortcut audit uses,
    so the probe is trained and scored on exactly the view it stands for; the rows (paths,
    labels, patients) are copied unchanged. Returns the fill.
    """
    fill = neutral_grey(load_split(processed, "train", classes)[0])
    hide = partial(occluded, view="center_hidden", fraction=fraction, fill=fill)
    for split in splits:
        images, _, rows = load_split(processed, split, classes)
        save_split(probe, split, images, rows, transform=hide)
    return fill


def class_probabilities(model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device,
                        memory_format: torch.memory_format = torch.contiguous_format, desc: str = "score") -> np.ndarray:
    """Class probabilities (N, classes) of ``model`` for uint8 images (N, H, W)."""
    labels = torch.zeros(len(images), dtype=torch.long)
    result = evaluate(model, iterate_batches(images, labels, batch_size), len(images),
                      nn.CrossEntropyLoss(), device, memory_format=memory_format, desc=desc)
    return result.probabilities


def chance_scores(labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """What a guess drawn from the class frequencies scores: accuracy sum(p²), macro-F1 1/classes.

    That guesser's precision and recall for each class both equal the class's share, so its
    F1 does too, and the macro mean of the shares is 1 / classes.
    """
    shares = np.bincount(labels, minlength=num_classes) / max(1, len(labels))
    return {"accuracy": float(np.square(shares).sum()), "f1_macro": 1.0 / num_classes}


def cam_inside_center(model: Classifier, images: np.ndarray, fraction: float, batch_size: int = 16) -> np.ndarray:
    """For each image, the share of its Grad-CAM mass (predicted class) inside the centre box.

    An image whose map is empty everywhere gets the box's share of the area, the value a
    uniform map would have, so it pulls the mean neither way.
    """
    x = torch.from_numpy(images).unsqueeze(1).float().div_(255)
    heatmaps = gradcam_heatmaps(model, x, batch_size=batch_size)
    rows, cols = center_box(images.shape[-1], fraction)
    inside = heatmaps[:, rows, cols].sum(axis=(1, 2), dtype=np.float64)
    total = heatmaps.sum(axis=(1, 2), dtype=np.float64)
    area = (rows.stop - rows.start) * (cols.stop - cols.start) / images.shape[-1] ** 2
    return np.where(total > 0, inside / np.maximum(total, 1e-12), area)


def per_class_sample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of at most ``per_class`` images of each class, drawn with ``seed``, in ascending order."""
    rng = np.random.default_rng(seed)
    chosen: Sequence[np.ndarray] = [
        rng.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)
