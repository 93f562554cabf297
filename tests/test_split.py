"""Indexing, the patient-grouped, stratified train/validation split, and collections held out of training."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxr.data.split import class_counts, index_split, make_splits, patient_id, split_train_val
from cxr.errors import PipelineError
from cxr.params import parse_params

from conftest import CLASSES, make_kaggle_tree

ROOT = Path(__file__).resolve().parents[1]

# Unequal class sizes, so stratification has something to keep; PNEUMONIA has two images per patient.
PER_CLASS = {"COVID19": 8, "NORMAL": 16, "PNEUMONIA": 24}
VAL_FRACTION = 0.25


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_kaggle_tree(tmp_path_factory.mktemp("split"), per_class=PER_CLASS, size=8)


@pytest.fixture(scope="module")
def splits(data_root: Path) -> dict[str, pd.DataFrame]:
    return make_splits(data_root, CLASSES, VAL_FRACTION, seed=42)


def error_of(call, *args) -> str:
    with pytest.raises(PipelineError) as excinfo:
        call(*args)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("file_name", "patient"),
    [
        ("person123_bacteria_456.jpeg", "person123"),
        ("person7_virus_9.jpeg", "person7"),
        ("PERSON12_BACTERIA_3.JPEG", "person12"),
        ("IM-0001-0001.jpeg", "im-0001"), ("IM-0001-0002.jpeg", "im-0001"),
        ("NORMAL2-IM-0012-0001.jpeg", "normal2-im-0012"), ("covid-19-pneumonia-15.jpg", "covid-19-pneumonia-15"),
        ("covid19_001.jpg", "covid19_001"),
        ("person_unknown.jpeg", "person_unknown"),
        ("xperson1_bacteria_2.jpeg", "xperson1_bacteria_2"),
    ],
)
def test_patient_id_reads_kermany_names_and_falls_back_to_the_file(file_name, patient):
    assert patient_id(file_name) == patient


def test_index_lists_every_image_with_its_label_and_patient(data_root):
    frame = index_split(data_root, "train", CLASSES)

    assert list(frame.columns) == ["path", "label", "patient"]
    assert frame["label"].value_counts().to_dict() == PER_CLASS
    on_disk = {p.relative_to(data_root).as_posix() for p in (data_root / "train").rglob("*") if p.is_file()}
    assert set(frame["path"]) == on_disk
    assert len(frame) == len(on_disk)
    row = frame.loc[frame["path"] == "train/PNEUMONIA/person3_bacteria_7.jpeg"].iloc[0]
    assert (row["label"], row["patient"]) == ("PNEUMONIA", "person3")
    assert frame.loc[frame["label"] == "PNEUMONIA", "patient"].nunique() == PER_CLASS["PNEUMONIA"] // 2


def test_index_rows_follow_the_class_list_not_the_folder_order(data_root):
    order = ("PNEUMONIA", "COVID19", "NORMAL")

    frame = index_split(data_root, "test", order)

    assert list(dict.fromkeys(frame["label"])) == list(order)
    first_covid = frame.index[frame["label"] == "COVID19"][0]
    assert list(frame["path"][first_covid : first_covid + 3]) == [
        "test/COVID19/covid19_000.jpg",
        "test/COVID19/covid19_001.jpg",
        "test/COVID19/covid19_002.jpg",
    ]


def test_os_junk_and_hidden_files_are_not_indexed_but_other_files_are(tmp_path):
    root = make_kaggle_tree(tmp_path, per_class=1, size=8)
    normal = root / "train" / "NORMAL"
    for junk in (".DS_Store", "Thumbs.db", "desktop.ini", "._IM-0000-0001.jpeg"):
        (normal / junk).write_bytes(b"\x00junk")
    (normal / "subfolder").mkdir()
    (normal / "notes.txt").write_text("not an image, but preprocess must report it")

    frame = index_split(root, "train", CLASSES)

    assert sorted(frame.loc[frame["label"] == "NORMAL", "path"]) == [
        "train/NORMAL/IM-0000-0001.jpeg",
        "train/NORMAL/notes.txt",
    ]


def test_a_class_without_images_is_one_line_naming_it(tmp_path):
    root = make_kaggle_tree(tmp_path, per_class={"COVID19": 2, "PNEUMONIA": 2}, size=8)
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00junk")

    assert error_of(index_split, root, "train", CLASSES) == f"{root / 'train'}: no images of class NORMAL"


def test_a_missing_class_folder_is_one_line_naming_it(tmp_path):
    root = make_kaggle_tree(tmp_path, per_class=2, classes=("COVID19", "NORMAL"), size=8)

    message = error_of(index_split, root, "train", CLASSES)

    assert message == f"{root / 'train' / 'PNEUMONIA'}: missing class folder PNEUMONIA/"


def test_no_patient_is_in_both_train_and_val(splits):
    train_patients = set(splits["train"]["patient"])
    val_patients = set(splits["val"]["patient"])

    assert train_patients & val_patients == set()
    assert any(p.startswith("person") for p in val_patients)


def test_train_and_val_partition_the_training_images(data_root, splits):
    indexed = index_split(data_root, "train", CLASSES)
    together = pd.concat([splits["train"], splits["val"]])

    assert sorted(together["path"]) == sorted(indexed["path"])
    assert not together["path"].duplicated().any()


def test_val_is_stratified_and_about_the_requested_size(splits):
    train_total = len(splits["train"]) + len(splits["val"])
    overall = {label: count / train_total for label, count in PER_CLASS.items()}
    val = splits["val"]["label"].value_counts(normalize=True).to_dict()

    assert set(val) == set(CLASSES)
    for label in CLASSES:
        assert abs(val[label] - overall[label]) <= 0.1, (label, val, overall)
    assert 0.15 <= len(splits["val"]) / train_total <= 0.35


def test_the_split_is_deterministic_for_a_seed_and_changes_with_it(data_root, splits):
    again = make_splits(data_root, CLASSES, VAL_FRACTION, seed=42)
    other = make_splits(data_root, CLASSES, VAL_FRACTION, seed=7)

    for name in ("train", "val", "test"):
        pd.testing.assert_frame_equal(again[name], splits[name])
    assert set(other["val"]["path"]) != set(splits["val"]["path"])


def test_the_test_split_is_listed_untouched(data_root, splits):
    pd.testing.assert_frame_equal(splits["test"], index_split(data_root, "test", CLASSES))
    assert splits["test"]["label"].value_counts().to_dict() == PER_CLASS
    assert all(path.startswith("test/") for path in splits["test"]["path"])


def test_a_patient_with_many_images_stays_in_one_split():
    rows = [
        {"path": f"train/{label}/{name}", "label": label, "patient": patient_id(name)}
        for label in CLASSES
        for name in [f"{label.lower()}_{i}.jpg" for i in range(8)]
    ]
    rows += [
        {"path": f"train/PNEUMONIA/person99_bacteria_{i}.jpeg", "label": "PNEUMONIA", "patient": "person99"}
        for i in range(10)
    ]
    frame = pd.DataFrame(rows)

    for seed in range(5):
        train, val = split_train_val(frame, 0.25, seed)
        assert (train["patient"] == "person99").sum() in (0, 10)
        assert (val["patient"] == "person99").sum() in (0, 10)


def test_too_few_patients_for_the_val_fraction_is_one_line(tmp_path):
    root = make_kaggle_tree(tmp_path, per_class=4, size=8)

    message = error_of(make_splits, root, CLASSES, 0.15, 42)

    assert message == "split.val_fraction=0.15 needs at least 7 patients per class; the smallest class has 2"


def test_class_counts_lists_every_class_even_when_absent(splits):
    without_covid = {"val": splits["val"][splits["val"]["label"] != "COVID19"], "test": splits["test"]}

    counts = class_counts(without_covid, CLASSES)

    assert list(counts["val"]) == [*CLASSES, "total"]
    assert counts["val"]["COVID19"] == 0
    assert counts["val"]["total"] == len(without_covid["val"])
    assert counts["test"] == {**PER_CLASS, "total": sum(PER_CLASS.values())}
    assert all(type(value) is int for split in counts.values() for value in split.values())


# --- split.unseen_groups: whole collections kept out of train and val -----------------------------------------


def test_left_out_images_are_in_neither_train_nor_val_and_the_test_split_is_untouched(data_root, splits):
    indexed = index_split(data_root, "train", CLASSES)
    leave_out = set(indexed["path"].iloc[::3])

    held = make_splits(data_root, CLASSES, VAL_FRACTION, seed=42, leave_out=leave_out)

    together = pd.concat([held["train"], held["val"]])
    assert sorted(together["path"]) == sorted(set(indexed["path"]) - leave_out)
    assert set(held["train"]["patient"]) & set(held["val"]["patient"]) == set()
    pd.testing.assert_frame_equal(held["test"], splits["test"])


def site_of(path: str) -> str:
    """The fixture's collections: every third image of each class folder is from 'north', the rest from 'south'."""
    return "north" if int("".join(c for c in Path(path).stem if c.isdigit()) or 0) % 3 == 0 else "south"


def split_project(tmp_path: Path, groups: dict | None, unseen: list[str]) -> Path:
    """A project the split stage can run in: data/raw in the Kaggle layout, a groups CSV and params."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    make_kaggle_tree(tmp_path, per_class=PER_CLASS, size=8).rename(project / "data" / "raw")
    images = sorted(p.relative_to(project / "data" / "raw").as_posix() for p in (project / "data" / "raw").rglob("*.*"))
    pd.DataFrame({"file": [f"Data/{p}" for p in images], "source_repo": [site_of(p) for p in images]}).to_csv(
        tmp_path / "groups.csv", index=False)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["split"].update(val_fraction=VAL_FRACTION, unseen_groups=unseen)
    raw["groups"] = groups
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return project


def run_split(project: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run stages/split.py in this process, in ``project``; returns its exit status."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "stages" / "split.py")])
    try:
        runpy.run_path(str(ROOT / "stages" / "split.py"), run_name="__main__")
    except SystemExit as exit:
        return int(exit.code)
    return 0


def test_the_split_stage_keeps_unseen_groups_out_of_train_and_val_and_records_them(tmp_path, monkeypatch):
    project = split_project(tmp_path, {"csv": str(tmp_path / "groups.csv")}, ["north"])

    assert run_split(project, monkeypatch) == 0

    tables = {name: pd.read_csv(project / "data" / "split" / f"{name}.csv") for name in ("train", "val", "test", "held_out")}
    pool = index_split(project / "data" / "raw", "train", CLASSES)
    north = {p for p in pool["path"] if site_of(p) == "north"}
    assert north and set(tables["held_out"]["path"]) == north
    assert set(tables["held_out"]["group"]) == {"north"}
    assert not (set(tables["train"]["path"]) | set(tables["val"]["path"])) & north
    assert sorted([*tables["train"]["path"], *tables["val"]["path"]]) == sorted(set(pool["path"]) - north)
    test_north = sum(site_of(p) == "north" for p in tables["test"]["path"])
    assert len(tables["test"]) == sum(PER_CLASS.values()) and test_north > 0
    report = json.loads((project / "reports" / "split.json").read_text())
    assert report == {"unseen_groups": {"north": {"removed_from_train_val": len(north), "test_images": test_north}}}


def test_without_unseen_groups_the_split_is_the_plain_one(tmp_path, monkeypatch):
    project = split_project(tmp_path, {"csv": str(tmp_path / "groups.csv")}, [])

    assert run_split(project, monkeypatch) == 0

    plain = make_splits(project / "data" / "raw", CLASSES, VAL_FRACTION, seed=42)
    for name in ("train", "val", "test"):
        written = pd.read_csv(project / "data" / "split" / f"{name}.csv", dtype=str)
        assert list(written["path"]) == list(plain[name]["path"])
    assert pd.read_csv(project / "data" / "split" / "held_out.csv").empty
    assert json.loads((project / "reports" / "split.json").read_text()) == {"unseen_groups": {}}


def test_an_unknown_unseen_group_is_one_line_naming_the_groups_that_exist(tmp_path, monkeypatch, capsys):
    project = split_project(tmp_path, {"csv": str(tmp_path / "groups.csv")}, ["west"])

    assert run_split(project, monkeypatch) == 1

    assert capsys.readouterr().err == ("error: params.yaml: split.unseen_groups lists 'west', not a group of the "
                                       "groups CSV; its groups: north, south\n")
    assert not (project / "data" / "split").exists()


def test_a_broken_groups_csv_stops_the_split_stage_first(tmp_path, monkeypatch, capsys):
    project = split_project(tmp_path, {"csv": str(tmp_path / "groups.csv"), "group_column": "site"}, [])

    assert run_split(project, monkeypatch) == 1

    assert capsys.readouterr().err == f"error: groups: {tmp_path / 'groups.csv'} has no column 'site'\n"
    assert not (project / "data" / "split").exists()


@pytest.mark.parametrize("groups", [None, {"csv": None}], ids=["groups_null", "csv_null"])
def test_unseen_groups_without_a_groups_csv_is_one_line(groups):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["groups"] = groups
    raw["split"]["unseen_groups"] = ["north"]

    assert error_of(parse_params, raw) == (
        "params.yaml: split.unseen_groups needs groups.csv set (the CSV that names each image's group)")
    raw["split"]["unseen_groups"] = []
    assert parse_params(raw).grouping is None
