"""Decode every image once into compact uint8 arrays, so training never touches JPEGs.

Each split becomes ``<split>.npy`` (N x size x size, uint8, memory-mappable) plus
``<split>.csv`` (the rows that were kept, in array order). Unreadable files are skipped
and reported with their reason rather than failing a 10,000-image run on one bad file.
Images are written into the memory-mapped file as they are decoded, so preprocessing a
split takes the same memory at 10,000 images as at 300,000.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap
from tqdm import tqdm

from cxr.data.images import decode_or_reason
from cxr.errors import PipelineError
from cxr.files import atomic_write
from cxr.parallel import ordered_map


def iter_decoded(paths: Iterable[Path], size: int, workers: int, desc: str = "decode",
                 total: int | None = None) -> Iterator[np.ndarray | str]:
    """Decode ``paths`` in order with ``workers`` processes, one image at a time; a failure becomes its reason.

    ``paths`` may be a generator (give ``total`` for the progress bar): it is read only as
    images are taken, so memory stays bounded however many files there are.
    """
    total = len(paths) if total is None and isinstance(paths, Sized) else total
    chunk = max(1, min(64, (total or 0) // (4 * workers)))
    decoded = ordered_map(partial(decode_or_reason, size=size), paths, workers, chunk)
    yield from tqdm(decoded, total=total, desc=desc, unit="img", mininterval=2.0)


def decode_into(array_path: Path, paths: Iterable[Path], total: int, size: int, workers: int,
                desc: str = "decode") -> dict[int, str]:
    """Decode the ``total`` files of ``paths`` straight into the ``.npy`` file ``array_path``.

    Returns the failures only, ``{position in paths: reason}``, so that a clean run of any
    size keeps nothing per image. The file is preallocated for every path and memory-mapped,
    so memory stays a few images per worker whatever the number of images; decoded images
    are written in order, with no hole where a file failed, and the file is cut down to the
    decoded ones at the end.
    """
    failures: dict[int, str] = {}
    kept = 0
    images = open_memmap(array_path, mode="w+", dtype=np.uint8, shape=(max(1, total), size, size))
    for index, result in enumerate(iter_decoded(paths, size, workers, desc, total)):
        if isinstance(result, str):
            failures[index] = result
        else:
            images[kept] = result
            kept += 1
    images.flush()
    del images
    if kept < max(1, total):
        _keep_first_rows(array_path, kept)
    return failures


def _keep_first_rows(array_path: Path, rows: int) -> None:
    """Rewrite ``array_path`` with only its first ``rows`` images, copied in chunks of bounded memory."""
    short = array_path.with_name(array_path.name + ".short")
    write_npy(short, np.load(array_path, mmap_mode="r")[:rows])
    short.replace(array_path)


def write_npy(path: Path, images: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None,
              chunk: int = 1024) -> None:
    """Write ``images`` (a memory map, say) to the ``.npy`` file ``path``, ``chunk`` images at a time,
    through ``transform`` when one is given, so an array larger than RAM can be rewritten."""
    if len(images) == 0:
        with path.open("wb") as handle:
            np.save(handle, np.zeros(images.shape, np.uint8))
        return
    target = open_memmap(path, mode="w+", dtype=np.uint8, shape=images.shape)
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start : start + chunk])
        target[start : start + chunk] = transform(block) if transform else block
    target.flush()
    del target


def preprocess_split(
    root: Path, frame: pd.DataFrame, size: int, workers: int, split: str, classes: Sequence[str], out_dir: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode one split into ``out_dir/<split>.npy`` and ``.csv``; returns (kept rows, skipped rows with ``reason``).

    Nothing is written when a class has no readable image left, and a kill leaves no half file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, pd.DataFrame] = {}

    def write_array(tmp: Path) -> None:
        failures = decode_into(tmp, (root / path for path in frame["path"]), len(frame), size, workers, desc=split)
        ok = np.ones(len(frame), dtype=bool)
        ok[list(failures)] = False
        outcome["kept"] = frame[ok].reset_index(drop=True)
        outcome["skipped"] = frame[~ok].assign(split=split, reason=list(failures.values()))
        missing = [label for label in classes if not (outcome["kept"]["label"] == label).any()]
        if missing:
            raise PipelineError(f"split {split!r} has no readable image of class {missing[0]} after skipping unreadable files")

    atomic_write(out_dir / f"{split}.npy", write_array)
    atomic_write(out_dir / f"{split}.csv", lambda tmp: outcome["kept"].to_csv(tmp, index=False))
    return outcome["kept"], outcome["skipped"].reset_index(drop=True)


def save_split(out_dir: Path, split: str, images: np.ndarray, kept: pd.DataFrame,
               transform: Callable[[np.ndarray], np.ndarray] | None = None, chunk: int = 1024) -> None:
    """Write ``<split>.npy`` (via :func:`write_npy`) and ``<split>.csv`` via temporary names, so a kill
    leaves no half file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / f"{split}.npy", lambda tmp: write_npy(tmp, images, transform, chunk))
    atomic_write(out_dir / f"{split}.csv", lambda tmp: kept.to_csv(tmp, index=False))


def load_split(processed_dir: Path, split: str, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Open a preprocessed split: (uint8 images N x H x W, int64 labels indexed by ``classes``, rows).

    The images are a read-only memory map: pages are read when a batch touches them and stay
    in the page cache, which the kernel can drop, so a split larger than RAM still trains.
    """
    array_path, csv_path = processed_dir / f"{split}.npy", processed_dir / f"{split}.csv"
    if not array_path.exists() or not csv_path.exists():
        raise PipelineError(f"{processed_dir}: no preprocessed {split} split; run `dvc repro preprocess` first")
    images = np.load(array_path, mmap_mode="r")
    rows = pd.read_csv(csv_path, dtype=str)
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown:
        raise PipelineError(f"{csv_path}: label {unknown[0]!r} is not one of {', '.join(classes)}")
    labels = np.array(rows["label"].map({name: i for i, name in enumerate(classes)}), dtype=np.int64)
    if len(labels) != len(images):
        raise PipelineError(f"{processed_dir}: {split}.npy has {len(images)} images but {split}.csv has {len(labels)} rows")
    return images, labels, rows
