"""Indexing and the patient-grouped, stratified train/validation split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cxr.data.split import class_counts, index_split, make_splits, patient_id, split_train_val
from cxr.errors import PipelineError

from conftest import CLASSES, make_kaggle_tree

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
