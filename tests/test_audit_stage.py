"""The audit stage's glue: counts, dedupe of train/val only, unreadable files left for preprocess."""

import shutil

import numpy as np
import pandas as pd
from PIL import Image

from cxr.data.audit import audit_splits
from cxr.data.split import make_splits
from cxr.params import CLASSES

from conftest import make_kaggle_tree


def test_planted_duplicate_is_counted_and_dropped_from_train_only_with_dedupe(tmp_path):
    root = make_kaggle_tree(tmp_path / "k", per_class=8, size=64)
    splits = make_splits(root, CLASSES, 0.25, 0)
    source = splits["train"].iloc[0]
    yy, xx = np.mgrid[0:96, 0:96]
    smooth = (127 + 60 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)  # structured, like anatomy
    Image.fromarray(smooth).save(root / source["path"], quality=95)
    copy = root / "test" / source["label"] / "copy_of_train.jpg"
    Image.fromarray(smooth).resize((64, 64)).save(copy, quality=60)
    splits["test"] = pd.concat(
        [splits["test"], pd.DataFrame([{"path": copy.relative_to(root).as_posix(), "label": source["label"],
                                        "patient": "copy"}])], ignore_index=True,
    )

    kept, pairs, summary = audit_splits(root, splits, threshold=4, workers=1, dedupe=False)
    assert summary["pairs"]["train-test"] >= 1
    assert ((pairs["path_a"] == source["path"]) & (pairs["path_b"] == copy.relative_to(root).as_posix())).any()
    assert all(len(kept[name]) == len(splits[name]) for name in splits)

    kept, _, summary = audit_splits(root, splits, threshold=4, workers=1, dedupe=True)
    assert source["path"] not in set(kept["train"]["path"])
    assert kept["test"].equals(splits["test"])
    assert summary["dropped"]["test"] == 0 and summary["dropped"]["train"] >= 1


def test_unreadable_files_stay_listed_for_preprocess_to_report(tmp_path):
    root = make_kaggle_tree(tmp_path / "k", per_class=8, size=64)
    splits = make_splits(root, CLASSES, 0.25, 0)
    (root / splits["val"].iloc[0]["path"]).write_bytes(b"")
    kept, _, summary = audit_splits(root, splits, threshold=4, workers=1, dedupe=True)
    assert summary["unhashable"] == 1
    assert len(kept["val"]) == len(splits["val"])
    shutil.rmtree(root)
