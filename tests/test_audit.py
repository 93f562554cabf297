"""Leakage audit: planted re-encoded copies are found, distinct images are not, test stays intact."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr.data import audit
from cxr.data.audit import (
    DEFAULT_THRESHOLD,
    PAIR_COLUMNS,
    close_pairs,
    count_by_split_pair,
    drop_leaking_rows,
    find_cross_split_duplicates,
    hash_images,
)
from cxr.errors import PipelineError

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]
SPLITS = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
PLANTED_SOURCE = 5  # a train image whose re-encoded copy is planted in test (0 bits apart here: margin below the threshold)


def xray_like(rng: np.random.Generator, size: int = 128) -> Image.Image:
    """A smooth grayscale image: a random gradient plus a few Gaussian blobs."""
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y
    for _ in range(6):
        centre_x, centre_y = rng.uniform(0.1, 0.9, size=2)
        spread = rng.uniform(0.05, 0.25)
        pixels = pixels + rng.uniform(-1, 1) * np.exp(-((x - centre_x) ** 2 + (y - centre_y) ** 2) / (2 * spread**2))
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    return Image.fromarray((pixels * 255).astype(np.uint8), mode="L")


@pytest.fixture
def clean_frame(tmp_path: Path) -> pd.DataFrame:
    """Twelve structurally different images over train/val/test, saved as JPEG at quality 95."""
    rng = np.random.default_rng(7)
    rows = []
    for index, split in enumerate(SPLITS):
        label = CLASSES[index % len(CLASSES)]
        path = tmp_path / split / label / f"image_{index:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        xray_like(rng).save(path, "JPEG", quality=95)
        rows.append({"path": str(path), "label": label, "split": split})
    return pd.DataFrame(rows)


@pytest.fixture
def leaky_frame(clean_frame: pd.DataFrame, tmp_path: Path) -> pd.DataFrame:
    """The clean set plus one train image copied into test at JPEG quality 60 and 96 px."""
    source = clean_frame.iloc[PLANTED_SOURCE]
    copy_path = tmp_path / "test" / source["label"] / "copy_of_train.jpg"
    with Image.open(source["path"]) as image:
        image.resize((96, 96), Image.BILINEAR).save(copy_path, "JPEG", quality=60)
    copy_row = {"path": str(copy_path), "label": source["label"], "split": "test"}
    return pd.concat([clean_frame, pd.DataFrame([copy_row])], ignore_index=True)


def hashes_of(frame: pd.DataFrame) -> np.ndarray:
    result = hash_images([Path(path) for path in frame["path"]])
    assert result.ok.all(), result.failures
    return result.hashes


def test_clean_images_are_far_apart_at_the_default_threshold(clean_frame):
    hashes = [int(value) for value in hashes_of(clean_frame)]
    closest = min(bin(a ^ b).count("1") for a, b in combinations(hashes, 2))
    assert closest > 2 * DEFAULT_THRESHOLD


def test_clean_fixture_has_no_cross_split_pairs(clean_frame):
    pairs = find_cross_split_duplicates(clean_frame, hashes_of(clean_frame), DEFAULT_THRESHOLD)
    assert list(pairs.columns) == PAIR_COLUMNS
    assert pairs.empty
    assert count_by_split_pair(pairs) == {"train-val": 0, "train-test": 0, "val-test": 0}


def test_finds_exactly_the_planted_reencoded_copy(leaky_frame):
    pairs = find_cross_split_duplicates(leaky_frame, hashes_of(leaky_frame), DEFAULT_THRESHOLD)
    assert len(pairs) == 1
    pair = pairs.iloc[0]
    assert pair["path_a"] == leaky_frame.iloc[PLANTED_SOURCE]["path"]
    assert (pair["split_a"], pair["split_b"]) == ("train", "test")
    assert pair["path_b"].endswith("copy_of_train.jpg")
    assert pair["label_a"] == pair["label_b"] == leaky_frame.iloc[PLANTED_SOURCE]["label"]
    assert 0 <= pair["distance"] <= DEFAULT_THRESHOLD
    assert count_by_split_pair(pairs) == {"train-val": 0, "train-test": 1, "val-test": 0}


def test_drop_removes_the_train_copy_and_leaves_test_intact(leaky_frame):
    pairs = find_cross_split_duplicates(leaky_frame, hashes_of(leaky_frame), DEFAULT_THRESHOLD)
    kept = drop_leaking_rows(leaky_frame, pairs)
    assert leaky_frame.iloc[PLANTED_SOURCE]["path"] not in set(kept["path"])
    assert len(kept) == len(leaky_frame) - 1
    test_before = leaky_frame[leaky_frame["split"] == "test"]
    pd.testing.assert_frame_equal(kept[kept["split"] == "test"], test_before)


def pair_row(path_a: str, split_a: str, path_b: str, split_b: str) -> dict:
    return {"path_a": path_a, "split_a": split_a, "label_a": "NORMAL",
            "path_b": path_b, "split_b": split_b, "label_b": "NORMAL", "distance": 1}


def test_drop_rule_keeps_test_and_val_over_train():
    frame = pd.DataFrame(
        {
            "path": ["t1", "t2", "v1", "v2", "s1", "s2"],
            "label": ["NORMAL"] * 6,
            "split": ["train", "train", "val", "val", "test", "test"],
        }
    )
    pairs = pd.DataFrame(
        [
            pair_row("t1", "train", "v1", "val"),
            pair_row("s1", "test", "v2", "val"),  # reversed order on purpose
            pair_row("t2", "train", "s2", "test"),
        ]
    )
    kept = drop_leaking_rows(frame, pairs)
    assert list(kept["path"]) == ["v1", "s1", "s2"]
    assert count_by_split_pair(pairs) == {"train-val": 1, "train-test": 1, "val-test": 1}


def test_unreadable_files_are_reported_with_their_reason(clean_frame, tmp_path):
    good = Path(clean_frame.iloc[0]["path"])
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_bytes(b"this is not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:400])
    missing = tmp_path / "missing.jpg"

    result = hash_images([good, not_an_image, truncated, missing])

    assert list(result.ok) == [True, False, False, False]
    assert len(result.hashes) == 4
    reasons = dict(result.failures)
    assert set(reasons) == {not_an_image, truncated, missing}
    assert "cannot identify image file" in reasons[not_an_image]
    assert "truncated" in reasons[truncated]
    assert reasons[missing].startswith("FileNotFoundError")


def test_hash_matches_imagehash_phash_bits(clean_frame):
    path = Path(clean_frame.iloc[0]["path"])
    with Image.open(path) as image:
        expected = int(str(imagehash.phash(image.convert("L"), hash_size=8)), 16)
    assert int(hash_images([path]).hashes[0]) == expected


def test_worker_processes_give_the_same_hashes(clean_frame, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 nope")
    paths = [Path(path) for path in clean_frame["path"]] + [broken]
    serial = hash_images(paths, workers=1)
    parallel = hash_images(paths, workers=2)
    np.testing.assert_array_equal(parallel.hashes, serial.hashes)
    np.testing.assert_array_equal(parallel.ok, serial.ok)
    assert parallel.failures == serial.failures


@pytest.mark.parametrize("count_bits", [audit.popcount, audit._popcount_lut])
def test_popcount_counts_every_bit(count_bits):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(0, 2**64, size=200, dtype=np.uint64), np.array([0, 2**64 - 1, 2**63], dtype=np.uint64)])
    expected = [bin(int(value)).count("1") for value in values]
    assert list(count_bits(values).astype(int)) == expected


def test_close_pairs_matches_brute_force_across_blocks(monkeypatch):
    monkeypatch.setattr(audit, "BLOCK_ELEMENTS", 500)  # many blocks, including a ragged last one
    rng = np.random.default_rng(3)
    hashes_a = rng.integers(0, 2**64, size=120, dtype=np.uint64)
    flips = np.array([1 << int(bit) for bit in rng.integers(0, 64, size=40)], dtype=np.uint64)
    hashes_b = np.concatenate([hashes_a[:40] ^ flips, rng.integers(0, 2**64, size=50, dtype=np.uint64)])
    threshold = 3
    expected = {
        (i, j, bin(int(a) ^ int(b)).count("1"))
        for i, a in enumerate(hashes_a)
        for j, b in enumerate(hashes_b)
        if bin(int(a) ^ int(b)).count("1") <= threshold
    }
    rows, cols, distances = close_pairs(hashes_a, hashes_b, threshold)
    assert set(zip(rows.tolist(), cols.tolist(), distances.tolist())) == expected
    assert len(expected) >= 40


def test_rejects_inputs_it_cannot_audit(clean_frame):
    hashes = np.zeros(len(clean_frame), dtype=np.uint64)
    with pytest.raises(PipelineError, match="threshold"):
        find_cross_split_duplicates(clean_frame, hashes, 65)
    with pytest.raises(PipelineError, match="holdout"):
        find_cross_split_duplicates(clean_frame.assign(split="holdout"), hashes, 4)
    with pytest.raises(PipelineError, match="split"):
        find_cross_split_duplicates(clean_frame.drop(columns="split"), hashes, 4)
    with pytest.raises(ValueError, match="same mask"):
        find_cross_split_duplicates(clean_frame, hashes[:-1], 4)
    with pytest.raises(PipelineError, match="workers"):
        hash_images([], workers=0)
