"""Unreadable images in every split (train, val and test) are skipped and reported, never fatal.

A generated Kaggle-layout data set (``conftest.make_bad_data_set``) gets three kinds of bad file
in every split:

* ``corrupt``: random bytes under a ``.jpeg``/``.jpg`` name (not an image at all),
* ``empty``: 0 bytes,
* ``truncated``: a valid JPEG of the set cut in half.

In ``Data/train`` the bad files of the PNEUMONIA and NORMAL classes come as one file of each
kind per (made-up) patient, so the patient-grouped split moves the three kinds together and
every patient group that lands in validation brings all three there.

Checked three ways: the library function ``preprocess_split`` (fast), the stage scripts run
one after another without DVC, and ``dvc repro`` of the whole pipeline (slow: the session's
shared project, conftest's ``reproduced_mini``, is built on this data set), which must run every
stage to the end and report each bad file exactly once, with a reason that names its kind, and
count them per split in ``metrics/data.json``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.data.audit import audit_splits
from cxr.data.preprocess import preprocess_split
from cxr.data.split import SPLIT_NAMES, index_split, make_splits
from cxr.files import read_json
from cxr.params import CLASSES

from conftest import BAD_KINDS, Reproduced, make_bad_data_set
from test_pipeline import make_project, ran_stages

# What preprocess writes after "<path>: " for each kind of bad file (conftest.BAD_KINDS); the three must differ.
REASONS = {
    "corrupt": "not an image (unrecognised file format)",
    "empty": "empty file",
    "truncated": "truncated or corrupt image data",
}
ALL_STAGES = {
    "download", "split", "audit", "preprocess", "train@custom", "train@extract", "train@finetune",
    "evaluate@custom", "evaluate@extract", "evaluate@finetune", "train_probe", "shortcuts", "external", "compare",
}
IMAGE_SIZE = 32  # what conftest's reproduced_mini uses
VAL_FRACTION = 0.25  # what make_project sets


def _where(tables: dict[str, pd.DataFrame], bad: dict[str, str]) -> dict[str, str]:
    """{bad path: the split table that lists it}; each bad file must be listed exactly once."""
    listed = pd.concat([frame.assign(split=name) for name, frame in tables.items()], ignore_index=True)
    counts = listed["path"].value_counts()
    for path in bad:
        assert counts.get(path, 0) == 1, f"{path} listed {counts.get(path, 0)} times in the split tables"
    split_of = dict(zip(listed["path"], listed["split"]))
    where = {path: split_of[path] for path in bad}
    for split in SPLIT_NAMES:
        kinds = {bad[path] for path, name in where.items() if name == split}
        assert kinds == set(BAD_KINDS), (
            f"the data set must put every kind of bad file into {split}; it has {sorted(kinds)} there "
            f"(the split moved them elsewhere: add bad groups or change their names)"
        )
    return where


def _check_skipped(skipped: pd.DataFrame, bad: dict[str, str], where: dict[str, str]) -> None:
    """``skipped`` lists each bad file exactly once, with its split, label and the reason of its kind."""
    duplicated = skipped["path"][skipped["path"].duplicated()].tolist()
    assert not duplicated, f"reported more than once: {duplicated}"
    assert set(skipped["path"]) == set(bad), (
        f"not reported: {sorted(set(bad) - set(skipped['path']))}; "
        f"reported but readable: {sorted(set(skipped['path']) - set(bad))}"
    )
    for row in skipped.itertuples(index=False):
        assert row.split == where[row.path], f"{row.path}: reported in {row.split}, listed in {where[row.path]}"
        assert row.label == row.path.split("/")[1], row
        reason = str(row.reason)
        assert "\n" not in reason, reason
        assert reason.endswith(f"{row.path}: {REASONS[bad[row.path]]}"), f"{row.path} ({bad[row.path]}): {reason!r}"


@pytest.fixture(scope="module")
def bad_data_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return make_bad_data_set(tmp_path_factory.mktemp("bad_data") / "images")


# --- library level (fast) -------------------------------------------------------------------------


def test_split_and_audit_keep_bad_files_listed(bad_data_set):
    """Split lists bad files (preprocess reports them); the audit counts them as unhashable and keeps them."""
    data, bad = bad_data_set
    splits = make_splits(data, CLASSES, VAL_FRACTION, seed=42)
    where = _where(splits, bad)
    audited, _, summary = audit_splits(data, splits, threshold=4, workers=1, dedupe=False)
    assert summary["unhashable"] == len(bad)
    assert _where(audited, bad) == where


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_split_skips_and_explains_each_bad_file(bad_data_set, workers, tmp_path):
    data, bad = bad_data_set
    splits = make_splits(data, CLASSES, VAL_FRACTION, seed=42)
    where = _where(splits, bad)
    reports = []
    for split in SPLIT_NAMES:
        kept, skipped = preprocess_split(data, splits[split], IMAGE_SIZE, workers, split, CLASSES, tmp_path)
        images = np.load(tmp_path / f"{split}.npy")
        assert sorted(path.name for path in tmp_path.glob(f"*{split}*")) == [f"{split}.csv", f"{split}.npy"]
        listed_bad = {p for p in splits[split]["path"] if p in bad}
        assert list(kept["path"]) == [p for p in splits[split]["path"] if p not in bad]
        assert images.shape == (len(splits[split]) - len(listed_bad), IMAGE_SIZE, IMAGE_SIZE)
        assert images.dtype == np.uint8
        assert set(skipped["path"]) == listed_bad
        reports.append(skipped)
    _check_skipped(pd.concat(reports, ignore_index=True), bad, where)


def test_index_split_lists_bad_files(bad_data_set):
    data, bad = bad_data_set
    listed = set(index_split(data, "test", CLASSES)["path"])
    assert {path for path in bad if path.startswith("test/")} <= listed


# --- stage scripts and dvc repro ------------------------------------------------------------------


def _check_project(project: Path, bad: dict[str, str]) -> None:
    """Outputs of split, audit and preprocess in ``project`` account for every bad file."""
    split_tables = {name: pd.read_csv(project / "data" / "split" / f"{name}.csv", dtype=str) for name in SPLIT_NAMES}
    where = _where(split_tables, bad)
    audited = {name: pd.read_csv(project / "data" / "audited" / f"{name}.csv", dtype=str) for name in SPLIT_NAMES}
    assert _where(audited, bad) == where

    skipped = pd.read_csv(project / "reports" / "skipped_images.csv", dtype=str, keep_default_na=False)
    assert list(skipped.columns) == ["split", "path", "label", "reason"]
    _check_skipped(skipped, bad, where)

    data = read_json(project / "metrics" / "data.json")
    expected_skipped = {split: sum(1 for name in where.values() if name == split) for split in SPLIT_NAMES}
    assert data["skipped"] == expected_skipped
    assert data["audit"]["unhashable"] == len(bad)
    for split in SPLIT_NAMES:
        frame = audited[split]
        assert data["listed"][split]["total"] == len(frame)
        for label in CLASSES:
            bad_here = sum(1 for path, name in where.items() if name == split and path.split("/")[1] == label)
            assert data["listed"][split][label] == int((frame["label"] == label).sum())
            assert data["processed"][split][label] == data["listed"][split][label] - bad_here, (split, label)
        assert data["processed"][split]["total"] == data["listed"][split]["total"] - expected_skipped[split]
        processed = pd.read_csv(project / "data" / "processed" / f"{split}.csv", dtype=str)
        assert len(processed) == data["processed"][split]["total"]
        assert not set(processed["path"]) & set(bad)
        assert np.load(project / "data" / "processed" / f"{split}.npy", mmap_mode="r").shape[0] == len(processed)


def _run_stage(project: Path, script: str) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(
        [sys.executable, f"stages/{script}.py"], cwd=project, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"stages/{script}.py failed ({done.returncode}):\n{done.stderr[-3000:]}"


def test_data_stages_run_through_bad_files(tmp_path):
    """download, split, audit and preprocess run as scripts (no DVC) and report every bad file."""
    data, bad = make_bad_data_set(tmp_path / "images")
    project = make_project(tmp_path, data.parent, image_size=IMAGE_SIZE, epochs=1)
    for script in ("download", "split", "audit", "preprocess"):
        _run_stage(project, script)
    _check_project(project, bad)


@pytest.mark.slow
def test_dvc_repro_runs_to_the_end_with_bad_files(reproduced_mini: Reproduced):
    """The session's mini project holds the bad files; its one full run went through every stage.

    That a second ``dvc repro`` of it runs nothing (no stage is left out of date by a bad file) is
    checked in a copy by test_pipeline, test_external and test_sweep.
    """
    assert ran_stages(reproduced_mini.log) == ALL_STAGES, reproduced_mini.log[-3000:]
    _check_project(reproduced_mini.project, reproduced_mini.bad)
    assert (reproduced_mini.project / "metrics" / "summary.json").is_file()
