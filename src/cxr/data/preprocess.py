"""Decode every image once into compact uint8 arrays, so training never touches JPEGs.

Each split becomes ``<split>.npy`` (N x size x size, uint8, memory-mappable) plus
``<split>.csv`` (the rows that were kept, in array order). Unreadable files are skipped
and reported with their reason rather than failing a 10,000-image run on one bad file.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr.data.images import decode_grayscale
from cxr.errors import ImageDecodeError, PipelineError
from cxr.files import atomic_write


def _decode_or_reason(path: Path, size: int) -> np.ndarray | str:
    try:
        return decode_grayscale(path, size)
    except ImageDecodeError as err:
        return str(err)


def decode_all(paths: Sequence[Path], size: int, workers: int, desc: str = "decode") -> list[np.ndarray | str]:
    """Decode ``paths`` in order with ``workers`` processes; a failure becomes its reason string."""
    decode = partial(_decode_or_reason, size=size)
    chunksize = max(1, min(64, len(paths) // (4 * workers) or 1))
    progress = partial(tqdm, total=len(paths), desc=desc, unit="img", mininterval=2.0)
    if workers == 1:
        return list(progress(map(decode, paths)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(progress(pool.map(decode, paths, chunksize=chunksize)))


def preprocess_split(
    root: Path, frame: pd.DataFrame, size: int, workers: int, split: str, classes: Sequence[str]
) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Decode one split; returns (images, kept rows, skipped rows with a ``reason`` column)."""
    results = decode_all([root / p for p in frame["path"]], size, workers, desc=split)
    ok = np.array([not isinstance(r, str) for r in results], dtype=bool)
    images = np.stack([r for r in results if not isinstance(r, str)]) if ok.any() else np.zeros((0, size, size), np.uint8)
    kept = frame[ok].reset_index(drop=True)
    skipped = frame[~ok].assign(split=split, reason=[r for r in results if isinstance(r, str)]).reset_index(drop=True)
    missing = [label for label in classes if not (kept["label"] == label).any()]
    if missing:
        raise PipelineError(f"split {split!r} has no readable image of class {missing[0]} after skipping unreadable files")
    return images, kept, skipped


def save_split(out_dir: Path, split: str, images: np.ndarray, kept: pd.DataFrame) -> None:
    """Write ``<split>.npy`` and ``<split>.csv`` via temporary names, so a kill leaves no half file."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def write_array(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.save(handle, images)

    atomic_write(out_dir / f"{split}.npy", write_array)
    atomic_write(out_dir / f"{split}.csv", lambda tmp: kept.to_csv(tmp, index=False))


def load_split(processed_dir: Path, split: str, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Load a preprocessed split: (uint8 images N x H x W, int64 labels indexed by ``classes``, rows)."""
    array_path, csv_path = processed_dir / f"{split}.npy", processed_dir / f"{split}.csv"
    if not array_path.exists() or not csv_path.exists():
        raise PipelineError(f"{processed_dir}: no preprocessed {split} split; run `dvc repro preprocess` first")
    images = np.load(array_path)
    rows = pd.read_csv(csv_path, dtype=str)
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown:
        raise PipelineError(f"{csv_path}: label {unknown[0]!r} is not one of {', '.join(classes)}")
    labels = np.array(rows["label"].map({name: i for i, name in enumerate(classes)}), dtype=np.int64)
    if len(labels) != len(images):
        raise PipelineError(f"{processed_dir}: {split}.npy has {len(images)} images but {split}.csv has {len(labels)} rows")
    return images, labels, rows
