"""Training that does not let one collection decide: balanced epochs and the worst-group score.

A model fitted to pooled images fits the majority collection first; a collection that is a
tenth of the images and whose films look different is fitted last, if at all, and a good
average score hides that (Sagawa et al., ICLR 2020). ``balance: group`` therefore draws
each epoch so that every (group, class) cell of the training split carries the same
expected weight, and ``balance: class`` does the same with the classes alone. An epoch is
``len(train)`` draws with replacement, so it keeps its number of steps and the learning-rate
schedule its length. ``select: worst_group`` keeps the epoch whose worst validation group
scores best, the criterion the balanced draws aim at.

Cells smaller than ``groups.min_images`` would be drawn hundreds of times per epoch and
memorised, so they are pooled per class; a pool that is still that small joins its
class's largest cell. Group DRO (per-cell loss weights updated during training) is not
offered: the engine's batches carry images and labels only, and under DDP the per-cell
losses would need one more all-reduce per step to keep the weights equal on every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxr.approaches import REGISTRY
from cxr.data.groups import group_of, load_groups, log_matches, worst_group
from cxr.data.preprocess import load_split
from cxr.errors import PipelineError
from cxr.params import Params
from cxr.training import distributed

log = logging.getLogger(__name__)

_ORDER_STREAM = 3  # seed_for stream of a balanced epoch's order under DDP (1 and 2: augmentation, dropout)
Cell = tuple[int, str | None]  # (class index, group); group None is the class's pool of small groups


@dataclass(frozen=True)
class ImageGroups:
    """The group of each train and validation image, in split order (:data:`~cxr.data.groups.UNGROUPED` if unlisted)."""

    train: np.ndarray
    val: np.ndarray


def image_groups(params: Params, approach: str, processed_dir: Path) -> ImageGroups | None:
    """Each train and val image's group when the recipe reads groups (``uses_groups``); else None, the CSV unread.

    The match rate of each split is logged: images the CSV does not list form one group,
    so a path column that does not fit the split would otherwise balance nothing without a word.
    """
    settings = params.grouping
    if settings is None or not params.approach(approach).uses_groups:
        return None
    table = load_groups(settings)
    found = []
    for split in ("train", "val"):
        paths = load_split(processed_dir, split, params.data.classes)[2]["path"]
        log_matches(settings, table, paths, split)
        found.append(group_of(paths, table).to_numpy(dtype=str))
    return ImageGroups(*found)


def groups_digest(groups: ImageGroups, min_images: int) -> str:
    """A digest of each train and validation image's group and of ``min_images``: part of a run's resume fingerprint."""
    digest = hashlib.blake2b(str(min_images).encode(), digest_size=16)
    for split in (groups.train, groups.val):
        digest.update(json.dumps(split.tolist()).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Cells:
    """The cell of each training image (``ids``, indices into ``names``)."""

    ids: np.ndarray
    names: list[str]

    def sizes(self) -> np.ndarray:
        return np.bincount(self.ids, minlength=len(self.names))

    def probabilities(self) -> torch.Tensor:
        """Each image's probability of being drawn, 1 / (cells x its cell's size): every cell totals 1 / cells."""
        per_image = 1.0 / (len(self.names) * self.sizes()[self.ids])
        return torch.from_numpy(per_image.astype(np.float64))

    def describe(self) -> str:
        """The cells and their sizes, for the log."""
        return ", ".join(f"{name} ({size})" for name, size in zip(self.names, self.sizes()))


def class_cells(labels: np.ndarray, classes: Sequence[str]) -> Cells:
    """One cell per class present in ``labels``."""
    present = sorted(set(labels.tolist()))
    index = {label: i for i, label in enumerate(present)}
    return Cells(np.array([index[label] for label in labels.tolist()], dtype=np.int64), [classes[i] for i in present])


def _pooled(counts: Counter[tuple[int, str]], min_images: int) -> dict[tuple[int, str], Cell]:
    """The cell of each (class, group) pair: itself, its class's pool of small groups, or its class's largest cell."""
    cell: dict[tuple[int, str], Cell] = {pair: pair if n >= min_images else (pair[0], None) for pair, n in counts.items()}
    size: Counter[Cell] = Counter()
    for pair, n in counts.items():
        size[cell[pair]] += n
    for label in {label for label, _ in counts}:
        pool = (label, None)
        large = [(n, key[1]) for key, n in size.items() if key[0] == label and key[1] is not None]
        if 0 < size[pool] < min_images and large:
            largest: Cell = (label, max(large)[1])
            cell = {pair: largest if target == pool else target for pair, target in cell.items()}
    return cell


def group_cells(labels: np.ndarray, groups: np.ndarray, classes: Sequence[str], min_images: int) -> Cells:
    """One cell per (group, class) with at least ``min_images`` images; smaller ones pooled per class (see module)."""
    pairs = list(zip(labels.tolist(), (str(group) for group in groups)))
    cell_of = _pooled(Counter(pairs), min_images)
    cells = sorted(set(cell_of.values()), key=lambda cell: (cell[0], cell[1] is None, cell[1] or ""))
    index = {cell: i for i, cell in enumerate(cells)}
    names = [f"{classes[label]}: small groups" if group is None else f"{classes[label]} in {group}"
             for label, group in cells]
    return Cells(np.array([index[cell_of[pair]] for pair in pairs], dtype=np.int64), names)


def draw_weights(approach: str, params: Params, labels: torch.Tensor, groups: ImageGroups | None,
                 ) -> torch.Tensor | None:
    """Each training image's draw probability under the recipe's ``balance``; None for ``balance: none``."""
    mode, classes = params.approach(approach).balance, list(params.data.classes)
    if mode == "none":
        return None
    if mode == "class":
        cells = class_cells(labels.cpu().numpy(), classes)
    elif groups is None or params.grouping is None:
        raise PipelineError(f"params.yaml: {REGISTRY[approach].section}.balance: group needs groups.csv set")
    else:
        cells = group_cells(labels.cpu().numpy(), groups.train, classes, params.grouping.min_images)
    log.info("%s: balance %s, each of %d cells weighs the same per epoch: %s", approach, mode, len(cells.names),
             cells.describe())
    return cells.probabilities()


def epoch_order(weights: torch.Tensor, generator: torch.Generator, seed: int, epoch: int) -> torch.Tensor:
    """One balanced epoch: ``len(weights)`` indices drawn with replacement, each with probability ∝ its weight.

    A single process draws from ``generator`` (the run's order generator, saved in the resume
    state). Under DDP every rank draws the same order from a seed of (seed, epoch) and takes
    every world-size-th index from its rank on, ``ceil(len / world size)`` each, as the
    uniform epochs do; a resumed run redraws it without saved state.
    """
    if not distributed.active():
        return torch.multinomial(weights, len(weights), replacement=True, generator=generator)
    size = distributed.world_size()
    shared = torch.Generator().manual_seed(distributed.seed_for(seed, _ORDER_STREAM, epoch, per_rank=False))
    order = torch.multinomial(weights, math.ceil(len(weights) / size) * size, replacement=True, generator=shared)
    return order[distributed.rank() :: size]


def worst_group_accuracy(correct: np.ndarray, groups: np.ndarray, min_images: int) -> float:
    """The lowest accuracy of any group with at least ``min_images`` images (of all groups when none has that many).

    ``correct`` and ``groups`` are aligned per image; smaller groups are too noisy to rank.
    """
    names, index, counts = np.unique(np.asarray(groups, dtype=str), return_inverse=True, return_counts=True)
    accuracy = dict(zip(names, np.bincount(index, weights=np.asarray(correct, dtype=np.float64)) / counts))
    return float(accuracy[worst_group(accuracy, dict(zip(names, counts)), min_images)])
