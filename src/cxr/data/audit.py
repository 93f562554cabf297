"""Leakage audit: near-duplicate images that sit in different splits.

Public chest X-ray collections are stitched together from overlapping sources, so the
same radiograph often appears twice, re-encoded or resized. A copy of a test image in
train inflates test scores; a copy in val makes early stopping and model choice look
better than they are. Byte hashes miss such copies, so images are compared by
perceptual hash.

Why ``imagehash.phash`` (hash_size 8, 64 bits): it keeps the signs of the lowest DCT
frequencies against their median, which survive JPEG re-encoding, resizing and mild
gamma changes. ``dhash`` is as robust to re-encoding but far less discriminative on
chest radiographs: every frontal chest film has the same coarse gradients, and in a
1,500-image sample of ``cxr3`` 2,451 pairs of *different* images were within 4 bits
under dhash, against 3 under phash.

Recommended threshold: **4 bits of 64** (:data:`DEFAULT_THRESHOLD`). Every phash has
32 bits set (one per coefficient above the median), so distances are even: 3 acts as 2
and 5 as 4. Measured on the ``cxr3`` radiographs: JPEG quality 60 plus a 0.75x resize
moved hashes by at most 2 bits (200 images); the full set, already de-duplicated by its
builder, still has 3 train-test pairs within 2 bits, 80 within 4 and 749 within 6, and
the pairs inspected were different patients. 64 bits cannot tell every two chest films
apart, so 4 is a trade: it leaves some room for small crops and gamma changes, and its
false matches cost 75 of 8,082 training images (0.9 %; only train/val images are
dropped), where 6 would cost 543 (6.7 %). Treat matches as candidates to look at, not proof.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from cxr.errors import PipelineError
from cxr.parallel import ordered_map

SPLIT_ORDER = ("train", "val", "test")
SPLIT_PAIRS = ("train-val", "train-test", "val-test")
HASH_BITS = 64
DEFAULT_THRESHOLD = 4
PAIR_COLUMNS = ["path_a", "split_a", "label_a", "path_b", "split_b", "label_b", "distance"]
BLOCK_ELEMENTS = 4_000_000  # hashes compared per numpy step: ~32 MB of uint64 XORs
_BYTE_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)


class HashResult(NamedTuple):
    """Hashes of a list of images, aligned with that list.

    ``hashes[i]`` belongs to ``paths[i]``; where the image could not be read, ``ok[i]`` is
    False and ``hashes[i]`` is 0 and meaningless. Keeping the arrays full length lets callers
    filter the image table and the hashes with the same mask: ``frame[ok]``, ``hashes[ok]``.
    ``failures`` lists each unreadable file with the reason, for the stage to report.
    """

    hashes: np.ndarray
    ok: np.ndarray
    failures: list[tuple[Path, str]]


def hash_images(paths: Sequence[Path], workers: int = 1) -> HashResult:
    """64-bit perceptual hashes of grayscale images; unreadable files are reported, not raised.

    One corrupt file among ten thousand should not stop the audit, so failures come back
    in the result instead of as :class:`~cxr.errors.ImageDecodeError`.
    ``workers > 1`` spreads decoding over processes, as decoding dominates the cost.
    """
    if workers < 1:
        raise PipelineError(f"audit workers must be at least 1, got {workers}")
    paths = [Path(path) for path in paths]
    chunk = max(1, min(64, len(paths) // (workers * 8)))
    outcomes = ordered_map(_hash_one, paths, workers if len(paths) > 1 else 1, chunk)
    hashes = np.zeros(len(paths), dtype=np.uint64)
    ok = np.zeros(len(paths), dtype=bool)
    failures = []
    for index, (path, (value, reason)) in enumerate(zip(paths, outcomes)):
        if reason is None:
            hashes[index] = value
            ok[index] = True
        else:
            failures.append((path, reason))
    return HashResult(hashes, ok, failures)


def _hash_one(path: Path) -> tuple[int, str | None]:
    """The phash of one image as an int, or 0 and the reason it could not be read."""
    try:
        with Image.open(path) as image:
            gray = image.convert("L")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return 0, f"{type(error).__name__}: {error}"
    bits = imagehash.phash(gray, hash_size=8).hash.flatten()
    return int(np.packbits(bits).view(">u8")[0]), None


def _popcount_lut(values: np.ndarray) -> np.ndarray:
    """Set bits per uint64 through a byte lookup table, for numpy < 2.0 (no ``bitwise_count``)."""
    as_bytes = np.ascontiguousarray(values, dtype=np.uint64).view(np.uint8)
    return _BYTE_POPCOUNT[as_bytes].reshape(*values.shape, 8).sum(axis=-1, dtype=np.uint8)


popcount = getattr(np, "bitwise_count", _popcount_lut)


def close_pairs(hashes_a: np.ndarray, hashes_b: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` with Hamming distance ``<= threshold`` between two hash arrays.

    Rows of ``hashes_a`` are taken in blocks so that memory stays bounded (about 32 MB)
    while each block is one vectorised XOR + popcount; 10,000 x 10,000 takes seconds.
    """
    hashes_a = np.asarray(hashes_a, dtype=np.uint64)
    hashes_b = np.asarray(hashes_b, dtype=np.uint64)
    block_rows = max(1, BLOCK_ELEMENTS // max(1, len(hashes_b)))
    rows, cols, distances = [], [], []
    for start in range(0, len(hashes_a), block_rows):
        block = hashes_a[start : start + block_rows]
        distance = popcount(block[:, None] ^ hashes_b[None, :])
        block_rows_hit, cols_hit = np.nonzero(distance <= threshold)
        rows.append(block_rows_hit + start)
        cols.append(cols_hit)
        distances.append(distance[block_rows_hit, cols_hit])
    if not rows:
        empty = np.array([], dtype=np.int64)
        return empty, empty, np.array([], dtype=np.uint8)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(distances)


def find_cross_split_duplicates(frame: pd.DataFrame, hashes: np.ndarray, threshold: int) -> pd.DataFrame:
    """Pairs of images in different splits whose hashes differ in at most ``threshold`` bits.

    ``frame`` (columns ``path``, ``label``, ``split``) and ``hashes`` are aligned by position.
    Only the three split pairs are compared, never a split with itself: duplicates within
    one split do not leak. Side ``a`` is always the earlier split in train, val, test, so
    ``split_a``-``split_b`` is one of :data:`SPLIT_PAIRS`. Sorted by distance, then paths.
    """
    _check_frame(frame, hashes)
    if not 0 <= threshold <= HASH_BITS:
        raise PipelineError(f"audit threshold must be between 0 and {HASH_BITS} bits, got {threshold}")
    hashes = np.asarray(hashes, dtype=np.uint64)
    split = frame["split"].to_numpy()
    parts = []
    for pair in SPLIT_PAIRS:
        split_a, split_b = pair.split("-")
        index_a = np.flatnonzero(split == split_a)
        index_b = np.flatnonzero(split == split_b)
        rows, cols, distances = close_pairs(hashes[index_a], hashes[index_b], threshold)
        parts.append(_pair_table(frame, index_a[rows], index_b[cols], distances))
    pairs = pd.concat(parts, ignore_index=True)
    return pairs.sort_values(["distance", "path_a", "path_b"], kind="stable").reset_index(drop=True)


def _check_frame(frame: pd.DataFrame, hashes: np.ndarray) -> None:
    """Fail early, naming the problem, when the table and hashes cannot be audited together."""
    missing = [column for column in ("path", "label", "split") if column not in frame.columns]
    if missing:
        raise PipelineError(f"audit table lacks column(s) {', '.join(missing)}")
    unknown = sorted(set(frame["split"]) - set(SPLIT_ORDER))
    if unknown:
        raise PipelineError(f"audit table has split value(s) {unknown}; expected {list(SPLIT_ORDER)}")
    if len(hashes) != len(frame):
        raise ValueError(f"{len(hashes)} hashes for {len(frame)} rows; filter both with the same mask")


def _pair_table(frame: pd.DataFrame, index_a: np.ndarray, index_b: np.ndarray, distances: np.ndarray) -> pd.DataFrame:
    """The pair rows for matched positions, with the ``PAIR_COLUMNS`` layout even when empty."""
    side_a = frame.iloc[index_a]
    side_b = frame.iloc[index_b]
    return pd.DataFrame(
        {
            "path_a": side_a["path"].to_numpy(dtype=object),
            "split_a": side_a["split"].to_numpy(dtype=object),
            "label_a": side_a["label"].to_numpy(dtype=object),
            "path_b": side_b["path"].to_numpy(dtype=object),
            "split_b": side_b["split"].to_numpy(dtype=object),
            "label_b": side_b["label"].to_numpy(dtype=object),
            "distance": distances.astype(np.int64),
        },
        columns=PAIR_COLUMNS,
    )


def count_by_split_pair(pairs: pd.DataFrame) -> dict[str, int]:
    """Number of near-duplicate pairs per split pair; all of :data:`SPLIT_PAIRS` always present."""
    counts = dict.fromkeys(SPLIT_PAIRS, 0)
    for split_a, split_b in zip(pairs["split_a"], pairs["split_b"]):
        earlier, later = sorted((split_a, split_b), key=SPLIT_ORDER.index)
        counts[f"{earlier}-{later}"] += 1
    return counts


def drop_leaking_rows(frame: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without the train/val images that have a near-duplicate in a later split.

    Of each pair the image in the earlier split (train before val before test) goes:
    - test is never changed, so scores stay comparable with every other run on it;
    - for train-val pairs the train copy goes, so val keeps the same make-up as test and
      stays a fair proxy of it for early stopping and model choice;
    - train is the largest split, so losing a copy there costs least.
    Rows are matched on (``path``, ``split``); the original index is kept.
    """
    doomed = set()
    for row in pairs.itertuples(index=False):
        sides = [(row.path_a, row.split_a), (row.path_b, row.split_b)]
        doomed.add(min(sides, key=lambda side: SPLIT_ORDER.index(side[1])))
    keep = [(path, split) not in doomed for path, split in zip(frame["path"], frame["split"])]
    return frame[np.array(keep, dtype=bool)]


def audit_splits(
    root: Path, splits: dict[str, pd.DataFrame], threshold: int, workers: int, dedupe: bool
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict[str, object]]:
    """Hash every listed image, find cross-split near-duplicates and optionally drop them.

    Returns the (possibly reduced) split tables, the pairs found and a summary for
    ``metrics/data.json``. Unreadable files are left in the tables: preprocessing reports them.
    """
    frame = pd.concat([table.assign(split=name) for name, table in splits.items()], ignore_index=True)
    result = hash_images([root / path for path in frame["path"]], workers)
    pairs = find_cross_split_duplicates(frame[result.ok].reset_index(drop=True), result.hashes[result.ok], threshold)
    kept = drop_leaking_rows(frame, pairs) if dedupe else frame
    audited = {name: kept[kept["split"] == name].drop(columns="split").reset_index(drop=True) for name in splits}
    summary = {
        "threshold": threshold,
        "pairs": count_by_split_pair(pairs),
        "unhashable": len(result.failures),
        "dedupe": dedupe,
        "dropped": {name: len(splits[name]) - len(audited[name]) for name in splits},
    }
    return audited, pairs, summary
