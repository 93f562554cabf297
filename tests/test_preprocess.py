"""Decoding splits into uint8 arrays, skipping unreadable files, and the saved array/CSV pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.data.images import decode_grayscale
from cxr.data.preprocess import decode_into, iter_decoded, load_split, preprocess_split, save_split
from cxr.data.split import index_split
from cxr.errors import PipelineError

from conftest import CLASSES, make_kaggle_tree

SIZE = 32
EMPTY = "train/COVID19/empty.jpg"
TRUNCATED = "train/NORMAL/truncated.jpeg"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """3 images per class at 40 px (so decoding resizes), plus a zero-byte and a truncated JPEG."""
    data = make_kaggle_tree(tmp_path / "raw", per_class=3, size=40, splits=("train",))
    (data / EMPTY).write_bytes(b"")
    whole = (data / "train" / "NORMAL" / "IM-0000-0001.jpeg").read_bytes()
    (data / TRUNCATED).write_bytes(whole[: len(whole) - 200])
    return data


@pytest.fixture
def frame(root: Path) -> pd.DataFrame:
    return index_split(root, "train", CLASSES)


def run(root: Path, frame: pd.DataFrame, workers: int = 1):
    """The split as preprocess writes it: (images read back from train.npy, kept rows, skipped rows)."""
    out = root.parent / f"processed-{workers}"
    kept, skipped = preprocess_split(root, frame, SIZE, workers, "train", CLASSES, out)
    return np.load(out / "train.npy"), kept, skipped


def test_images_are_uint8_squares_in_the_order_of_the_kept_rows(root, frame):
    images, kept, _ = run(root, frame)

    assert images.dtype == np.uint8
    assert images.shape == (len(kept), SIZE, SIZE)
    assert len(kept) == 9
    for image, path in zip(images, kept["path"]):
        np.testing.assert_array_equal(image, decode_grayscale(root / path, SIZE))


def test_unreadable_files_are_skipped_with_a_reason_and_the_rest_kept(root, frame):
    _, kept, skipped = run(root, frame)

    bad = frame["path"].isin([EMPTY, TRUNCATED])
    pd.testing.assert_frame_equal(kept, frame[~bad].reset_index(drop=True))
    assert list(skipped.columns) == ["path", "label", "patient", "split", "reason"]
    assert list(skipped["path"]) == [EMPTY, TRUNCATED]
    assert list(skipped["split"]) == ["train", "train"]
    reasons = dict(zip(skipped["path"], skipped["reason"]))
    assert reasons[EMPTY] == f"{root / EMPTY}: empty file"
    assert reasons[TRUNCATED] == f"{root / TRUNCATED}: truncated or corrupt image data"


def test_nothing_is_skipped_from_a_clean_split(root, frame):
    clean = frame[~frame["path"].isin([EMPTY, TRUNCATED])].reset_index(drop=True)

    images, kept, skipped = run(root, clean)

    pd.testing.assert_frame_equal(kept, clean)
    assert len(images) == len(clean)
    assert skipped.empty


def test_a_class_left_without_readable_images_is_one_line(root, frame):
    for path in frame.loc[frame["label"] == "PNEUMONIA", "path"]:
        (root / path).write_bytes(b"")

    with pytest.raises(PipelineError) as excinfo:
        run(root, frame)

    assert str(excinfo.value) == (
        "split 'train' has no readable image of class PNEUMONIA after skipping unreadable files"
    )
    assert not any((root.parent / "processed-1").iterdir())  # no array without its rows, no temporary file


def test_the_split_is_a_plain_npy_file_opened_as_a_read_only_memory_map(root, frame):
    images, kept, _ = run(root, frame)
    out = root.parent / "processed-1"
    assert sorted(path.name for path in out.iterdir()) == ["train.csv", "train.npy"]  # compacted in place

    mapped, labels, rows = load_split(out, "train", CLASSES)

    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, images)
    pd.testing.assert_frame_equal(rows, kept.astype(str))


def test_a_split_where_every_file_fails_leaves_an_empty_array(root, frame, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    failures = decode_into(out / "x.npy", [root / EMPTY, root / TRUNCATED], 2, SIZE, workers=1)
    assert sorted(failures) == [0, 1] and np.load(out / "x.npy").shape == (0, SIZE, SIZE)
    assert [path.name for path in out.iterdir()] == ["x.npy"]


def test_two_workers_give_byte_identical_results(root, frame):
    serial = run(root, frame, workers=1)
    parallel = run(root, frame, workers=2)

    assert parallel[0].dtype == serial[0].dtype
    assert parallel[0].tobytes() == serial[0].tobytes()
    pd.testing.assert_frame_equal(parallel[1], serial[1])
    pd.testing.assert_frame_equal(parallel[2], serial[2])


def test_decoding_keeps_the_input_order_and_turns_failures_into_reasons(root, frame):
    paths = [root / p for p in frame["path"]]

    results = list(iter_decoded(paths, SIZE, workers=1))

    assert len(results) == len(paths)
    for path, result in zip(paths, results):
        if path.name in ("empty.jpg", "truncated.jpeg"):
            assert isinstance(result, str) and result.startswith(f"{path}: ")
        else:
            np.testing.assert_array_equal(result, decode_grayscale(path, SIZE))


def test_save_and_load_round_trip_with_labels_from_the_class_list(root, frame, tmp_path):
    images, kept, _ = run(root, frame)
    shuffled = kept.sample(frac=1.0, random_state=0).reset_index(drop=True)
    shuffled_images = images[[int(np.flatnonzero(kept["path"] == p)[0]) for p in shuffled["path"]]]
    out = tmp_path / "processed"

    save_split(out, "train", shuffled_images, shuffled)
    loaded_images, labels, rows = load_split(out, "train", CLASSES)

    np.testing.assert_array_equal(loaded_images, shuffled_images)
    assert loaded_images.dtype == np.uint8
    pd.testing.assert_frame_equal(rows, shuffled)
    assert labels.dtype == np.int64
    assert labels.tolist() == [CLASSES.index(label) for label in shuffled["label"]]


def test_labels_follow_the_given_class_list_not_the_rows(tmp_path):
    rows = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["PNEUMONIA", "NORMAL"], "patient": ["a", "b"]})
    save_split(tmp_path, "val", np.zeros((2, 4, 4), np.uint8), rows)

    _, labels, _ = load_split(tmp_path, "val", CLASSES)

    assert labels.tolist() == [2, 1]


def test_save_leaves_only_the_two_files_and_replaces_older_ones(root, frame, tmp_path):
    images, kept, _ = run(root, frame)
    out = tmp_path / "processed"
    save_split(out, "train", np.zeros((1, SIZE, SIZE), np.uint8), kept.iloc[:1])

    save_split(out, "train", images, kept)

    assert sorted(p.name for p in out.iterdir()) == ["train.csv", "train.npy"]
    assert np.load(out / "train.npy", mmap_mode="r").shape == (len(kept), SIZE, SIZE)
    assert len(pd.read_csv(out / "train.csv")) == len(kept)


@pytest.mark.parametrize("present", [[], ["val.npy"], ["val.csv"]])
def test_load_split_names_the_folder_when_files_are_missing(tmp_path, present):
    for name in present:
        (tmp_path / name).write_bytes(b"")

    with pytest.raises(PipelineError) as excinfo:
        load_split(tmp_path, "val", CLASSES)

    assert str(excinfo.value) == f"{tmp_path}: no preprocessed val split; run `dvc repro preprocess` first"


def test_load_split_rejects_an_unknown_label(tmp_path):
    rows = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["NORMAL", "TUBERCULOSIS"], "patient": ["a", "b"]})
    save_split(tmp_path, "test", np.zeros((2, 4, 4), np.uint8), rows)

    with pytest.raises(PipelineError) as excinfo:
        load_split(tmp_path, "test", CLASSES)

    assert str(excinfo.value) == (
        f"{tmp_path / 'test.csv'}: label 'TUBERCULOSIS' is not one of COVID19, NORMAL, PNEUMONIA"
    )


def test_load_split_rejects_arrays_and_rows_that_disagree(tmp_path):
    rows = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["NORMAL", "COVID19"], "patient": ["a", "b"]})
    save_split(tmp_path, "test", np.zeros((3, 4, 4), np.uint8), rows)

    with pytest.raises(PipelineError) as excinfo:
        load_split(tmp_path, "test", CLASSES)

    assert str(excinfo.value) == f"{tmp_path}: test.npy has 3 images but test.csv has 2 rows"


def test_save_split_rewrites_a_memory_map_chunk_by_chunk_through_a_transform(tmp_path):
    rows = pd.DataFrame({"path": list("abcde"), "label": ["NORMAL"] * 5, "patient": list("abcde")})
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    save_split(tmp_path / "a", "test", images, rows)
    mapped, _, _ = load_split(tmp_path / "a", "test", CLASSES)

    save_split(tmp_path / "b", "test", mapped, rows, transform=lambda block: 255 - block, chunk=2)

    np.testing.assert_array_equal(np.load(tmp_path / "b" / "test.npy"), 255 - images)
