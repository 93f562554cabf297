"""The Grad-CAM gallery: a PNG grid of where a model looks when it is right and when it is wrong.

The drawing lives here, apart from :mod:`cxr.evaluation.saliency` (the maps and the examples
chosen), so evaluation computes and reporting draws; :func:`gradcam_gallery` joins the two for
the evaluate stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr.evaluation.saliency import OUTCOMES, gradcam_heatmaps, overlay, select_examples
from cxr.reporting.pngs import png_figure
from cxr.training.models import Classifier

TILE_INCHES = 1.6
GALLERY_DPI = 100


def _slots(examples: pd.DataFrame, classes: Sequence[str]) -> tuple[dict[tuple[int, int], int], int]:
    """Map (row, column) grid slots to positions in ``examples``; returns the map and slots per outcome."""
    width = max([1, *examples.groupby(["label", "outcome"]).size().tolist()])
    slots: dict[tuple[int, int], int] = {}
    for row, name in enumerate(classes):
        for block, outcome in enumerate(OUTCOMES):
            chosen = np.flatnonzero((examples["label"] == name).to_numpy() & (examples["outcome"] == outcome).to_numpy())
            for offset, position in enumerate(chosen):
                slots[(row, block * width + offset)] = int(position)
    return slots, width


def gallery(
    images_uint8: np.ndarray,
    heatmaps: np.ndarray,
    examples: pd.DataFrame,
    classes: Sequence[str],
    title: str,
    path: Path,
) -> None:
    """Write a PNG grid: one row per true class, correct examples on the left, wrong ones on the right.

    ``images_uint8`` (K, H, W) and ``heatmaps`` (K, H, W) are aligned with the rows of
    ``examples`` (as returned by :func:`select_examples`): array position i is row i.
    """
    if len(images_uint8) != len(examples) or len(heatmaps) != len(examples):
        raise ValueError(
            f"{len(images_uint8)} images and {len(heatmaps)} heatmaps for {len(examples)} examples; "
            "pass arrays aligned with the examples' rows"
        )
    slots, width = _slots(examples, classes)
    rows, columns = max(1, len(classes)), 2 * width
    size = (columns * TILE_INCHES, rows * TILE_INCHES + 0.6)
    with png_figure(path, GALLERY_DPI, rows, columns, figsize=size) as (figure, axes):
        for (row, column), ax in np.ndenumerate(axes):
            ax.axis("off")
            position = slots.get((row, column))
            if position is None:
                continue
            example = examples.iloc[position]
            ax.imshow(overlay(images_uint8[position], heatmaps[position]))
            ax.set_title(f"{example['label']}→{example['predicted']}\n{example['confidence']:.2f}", fontsize=6.5)
        for row, name in enumerate(classes):
            axes[row, 0].text(-0.08, 0.5, name, transform=axes[row, 0].transAxes, rotation=90, ha="right", va="center")
        figure.suptitle(f"{title}\nper true class: {width} correct (left), {width} wrong (right)", fontsize=9)
        figure.tight_layout()


def gradcam_gallery(
    model: Classifier, images: np.ndarray, frame: pd.DataFrame, classes: Sequence[str], per_class: int, title: str,
    path: Path,
) -> None:
    """Select examples from a split's predictions, compute their Grad-CAM maps and draw the gallery.

    ``images`` are the split's uint8 arrays in the same row order as ``frame``. Each map
    explains the class ``frame`` predicted, which the tile's title shows, even where the model
    alone would pick another (``frame`` may hold test-time-augmented predictions).
    """
    examples = select_examples(frame, classes, per_class)
    chosen = images[examples.index.to_numpy()]
    pixels = torch.from_numpy(np.ascontiguousarray(chosen)).unsqueeze(1).float() / 255
    targets = [list(classes).index(name) for name in examples["predicted"]]
    heatmaps = gradcam_heatmaps(model, pixels, targets) if len(chosen) else np.zeros_like(chosen, dtype=np.float32)
    gallery(chosen, heatmaps, examples, classes, title, path)
