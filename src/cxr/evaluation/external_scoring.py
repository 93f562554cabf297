"""External validation: fetch another data set and score every trained model and the ensemble on it.

Nothing is retrained or refitted here. Each set named under ``external`` in params.yaml is
fetched with the code that fetches ``data.source`` (``kaggle:owner/dataset``, a .zip, a folder
or an https URL) and its scored images are installed as ``data/external/<name>/<class>/``. Images
go through the pipeline's own decoding at each model's image size, the approaches in
``evaluate.tta`` are scored with test-time augmentation as the evaluate stage scores them,
and the ensemble averages the models' probabilities with the weights compare uses.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxr import paths
from cxr.approaches import ENSEMBLE
from cxr.data.candidates import is_candidate_image
from cxr.data.download import KaggleDownloader, find_data_root, install_source, kagglehub_download
from cxr.data.preprocess import iter_decoded
from cxr.data.sources import (
    DEFAULT_LIMITS,
    KAGGLE,
    KAGGLE_HANDLE,
    KAGGLE_PREFIX,
    Source,
    SourceLimits,
    project_of,
    resolve_source,
)
from cxr.errors import PipelineError
from cxr.evaluation.ensemble import ensemble_frame
from cxr.evaluation.inference import load_trained_model
from cxr.evaluation.predictions import predictions_frame
from cxr.evaluation.tta import ViewAveraged
from cxr.training.engine import evaluate, iterate_batches
from cxr.training.models import load_checkpoint

SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RESERVED_NAMES = frozenset({"index"})  # metrics/external/index.json lists the sets
MAX_WRAPPING_DEPTH = 3  # top folders a re-packed zip may add around the class folders, as find_data_root allows


def check_sets(external: Mapping[str, str]) -> None:
    """Reject set names that cannot be file names of their own, and Kaggle sources not written ``kaggle:owner/dataset``."""
    for name, source in external.items():
        if not SET_NAME.match(name) or name in RESERVED_NAMES:
            raise PipelineError(f"params.yaml: external set name {name!r}: use letters, digits, - and _ (not 'index')")
        if source == KAGGLE:
            raise PipelineError(f"params.yaml: external.{name} is 'kaggle'; give the Kaggle data set instead "
                                "(kaggle:owner/dataset or kaggle:owner/dataset/versions/N)")


def kaggle_handle_of(source: str) -> str | None:
    """The Kaggle handle of a ``kaggle:owner/dataset[/versions/N]`` source, else ``None`` (a path or URL)."""
    if not source.startswith(KAGGLE_PREFIX):
        return None
    handle = source[len(KAGGLE_PREFIX):]
    return handle if KAGGLE_HANDLE.match(handle) else None


def resolve_external(name: str, source: str, destination: Path) -> Source:
    """Resolve and check one set's source (see :func:`~cxr.data.sources.resolve_source`) before anything is written."""
    return resolve_source(source, f"external.{name}", destination, None, project_of(destination.parent, paths.EXTERNAL_DATA))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")


def _holds_images(folder: Path) -> bool:
    return any(is_candidate_image(p) for p in folder.iterdir())


def _class_folder_root(folder: Path, classes: Sequence[str]) -> Path:
    """The folder holding the class folders of a plain layout, below at most three wrapping folders."""
    for _ in range(MAX_WRAPPING_DEPTH):
        inside = _subfolders(folder)
        if len(inside) != 1 or inside[0].name in classes or _holds_images(inside[0]):
            break
        folder = inside[0]
    return folder


def locate_scored_folder(fetched: Path, classes: Sequence[str], key: str) -> tuple[Path, str]:
    """The folder of class folders to score in a fetched set, and its scope (``test`` or ``all``).

    A Kaggle layout (``Data/{train,test}/<class>/``) is scored on ``test/`` when it has one,
    else on ``train/``, its only images; plain class folders (``<class>/*``, possibly inside
    wrapping folders) are scored whole. A class folder not in ``classes`` is an error.
    """
    kaggle_layout = any(
        p.is_dir() and p.name in ("train", "test") and "__MACOSX" not in p.parts
        for depth in ("*", "*/*", "*/*/*", "*/*/*/*") for p in fetched.glob(depth)
    )
    if kaggle_layout:
        root = find_data_root(fetched)
        scope = "test" if (root / "test").is_dir() else "all"
        folder = root / ("test" if scope == "test" else "train")
    else:
        folder, scope = _class_folder_root(fetched, classes), "all"
    present = [p.name for p in _subfolders(folder)]
    unknown = [name for name in present if name not in classes]
    if unknown:
        raise PipelineError(f"{key}: unknown class folder {unknown[0]!r}; expected only {', '.join(classes)}")
    if not present:
        raise PipelineError(f"{key}: no class folders found (expected <class>/ folders, or the Kaggle layout "
                            "Data/{train,test}/<class>/)")
    return folder, scope


def fetch_external(
    name: str, source: str | Source, classes: Sequence[str], destination: Path,
    kaggle: KaggleDownloader = kagglehub_download, limits: SourceLimits = DEFAULT_LIMITS,
) -> str:
    """Fetch one set and install its scored class folders as ``destination``; returns the scope.

    ``source`` is the param value or its :func:`resolve_external` result. Every failure names the
    set's params key, since several sets may be fetched in one run.
    """
    key = f"external.{name}"
    found: dict[str, str] = {}

    def scored_folder(fetched: Path) -> Path:
        folder, found["scope"] = locate_scored_folder(fetched, classes, key)
        return folder

    try:
        resolved = source if isinstance(source, Source) else resolve_external(name, source, destination)
        install_source(resolved, None, destination, scored_folder, kaggle, key, limits)
    except PipelineError as err:
        # the shared Kaggle errors point at the training data's params; here the set's own key is the one to fix
        message = str(err).replace("data.kaggle_handle", key).replace("data.source", key)
        raise PipelineError(message if message.startswith(key) else f"{key}: {message}") from None
    return found["scope"]


def list_images(folder: Path, classes: Sequence[str]) -> pd.DataFrame:
    """Candidate image files of an installed set as ``path`` (relative to ``folder``) and ``label``, class by class."""
    rows = [
        {"path": path.relative_to(folder).as_posix(), "label": label}
        for label in classes if (folder / label).is_dir()
        for path in sorted((folder / label).iterdir()) if is_candidate_image(path)
    ]
    return pd.DataFrame(rows, columns=["path", "label"])


@dataclass
class DecodedSet:
    """An installed set's readable images at each size asked for (same rows), and the files skipped."""

    images: dict[int, np.ndarray]
    rows: pd.DataFrame
    skipped: pd.DataFrame


def decode_set(folder: Path, listed: pd.DataFrame, sizes: Sequence[int], workers: int) -> DecodedSet:
    """Decode every listed file at each size with the preprocess stage's decoding.

    Unreadable files are skipped with their reason, as preprocess skips them; a file is kept only
    if it decodes at every size, so all models (and the ensemble) score the same images.
    """
    results = {size: list(iter_decoded([folder / p for p in listed["path"]], size, workers, desc=f"{folder.name} {size}px"))
               for size in sizes}
    reasons = [next((r[i] for r in results.values() if isinstance(r[i], str)), None) for i in range(len(listed))]
    ok = np.array([reason is None for reason in reasons], dtype=bool)
    if not ok.any():
        raise PipelineError(f"{folder}: no readable image to score ({len(listed)} files listed, none readable)")
    images = {size: np.stack([r for r, keep in zip(decoded, ok) if keep]) for size, decoded in results.items()}
    skipped = listed[~ok].assign(reason=[r for r in reasons if r is not None]).reset_index(drop=True)
    return DecodedSet(images, listed[ok].reset_index(drop=True), skipped)


@dataclass
class Scorer:
    """A trained model as the evaluate stage scores it (view-averaged for ``evaluate.tta``), and its image size."""

    model: nn.Module
    image_size: int


def load_scorers(
    model_files: Mapping[str, Path], classes: Sequence[str], tta: Sequence[str], device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, Scorer]:
    """Every approach's checkpoint, wrapped in :class:`ViewAveraged` when ``tta`` names it, as stages/evaluate.py does."""
    scorers = {}
    for approach, path in model_files.items():
        model, checkpoint = load_trained_model(path, classes, device, memory_format)
        scorers[approach] = Scorer(ViewAveraged(model) if approach in tta else model, checkpoint["image_size"])
    return scorers


def image_sizes(model_files: Mapping[str, Path]) -> list[int]:
    """The image sides the checkpoints were trained at, read before any model is built (decoding forks workers)."""
    return sorted({load_checkpoint(path)["image_size"] for path in model_files.values()})


def predict_images(
    scorer: Scorer, decoded: DecodedSet, classes: Sequence[str], batch_size: int, device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format, desc: str = "external",
) -> pd.DataFrame:
    """A predictions table (as evaluate writes for the test split) of one model on a decoded set."""
    labels = np.array(decoded.rows["label"].map({name: i for i, name in enumerate(classes)}), dtype=np.int64)
    images = torch.from_numpy(decoded.images[scorer.image_size])
    result = evaluate(scorer.model, iterate_batches(images, torch.from_numpy(labels), batch_size), len(labels),
                      nn.CrossEntropyLoss(), device, memory_format=memory_format, desc=desc)
    return predictions_frame(decoded.rows["path"], labels, result.probabilities, classes)


def score_set(
    scorers: Mapping[str, Scorer], decoded: DecodedSet, classes: Sequence[str], weights: Mapping[str, float],
    batch_size: int, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, pd.DataFrame]:
    """Predictions of every model on a decoded set, and of the soft-voting ensemble with ``weights``."""
    frames = {approach: predict_images(scorer, decoded, classes, batch_size, device, memory_format, desc=approach)
              for approach, scorer in scorers.items()}
    frames[ENSEMBLE] = ensemble_frame(frames, classes, weights)
    return frames


def internal_predictions(
    test_files: Mapping[str, Path], classes: Sequence[str], weights: Mapping[str, float]
) -> dict[str, pd.DataFrame]:
    """The evaluate stages' test predictions of each approach, and the ensemble's from them (as compare builds it)."""
    frames = {approach: pd.read_csv(path) for approach, path in test_files.items()}
    frames[ENSEMBLE] = ensemble_frame(frames, classes, weights)
    return frames


def decode_workers() -> int:
    """Decoding processes: the CPUs this process may use, at most 8 (decoding gives the same pixels with any count)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))

