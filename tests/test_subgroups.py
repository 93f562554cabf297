"""Subgroup report: per-group scores from a user's CSV, paths matched with or without ``Data/``, the worst group named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.errors import PipelineError
from cxr.params import CLASSES, GroupsParams
from cxr.reporting.subgroups import UNGROUPED, load_groups, subgroup_report, subgroups_markdown

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr3" / "manifest.csv"


def predictions(paths: list[str], labels: list[str], predicted: list[str]) -> pd.DataFrame:
    probabilities = np.eye(len(CLASSES))[[CLASSES.index(p) for p in predicted]]
    frame = pd.DataFrame({"path": paths, "label": labels, "predicted": predicted})
    return frame.join(pd.DataFrame(probabilities, columns=[f"prob_{c}" for c in CLASSES]))


@pytest.fixture
def groups_csv(tmp_path) -> Path:
    rows = [(f"Data/test/{label}/{site}_{i}.jpg", site) for site in ("adult", "child") for label in CLASSES for i in range(5)]
    path = tmp_path / "groups.csv"
    pd.DataFrame(rows, columns=["file", "site"]).to_csv(path, index=False)
    return path


def test_each_group_is_scored_and_the_worst_one_named(groups_csv):
    paths, labels, predicted = [], [], []
    for site in ("adult", "child"):
        for label in CLASSES:
            for i in range(5):
                paths.append(f"test/{label}/{site}_{i}.jpg")
                labels.append(label)
                predicted.append(label if site == "child" or label == "COVID19" else "COVID19")
    paths.append("test/NORMAL/unlisted.jpg")
    labels.append("NORMAL")
    predicted.append("NORMAL")
    frame = predictions(paths, labels, predicted)
    report = subgroup_report({"custom": frame}, load_groups(GroupsParams(csv=str(groups_csv), group_column="site")),
                             list(CLASSES), 200, 0)["custom"]
    assert set(report["groups"]) == {"adult", "child", UNGROUPED}
    assert report["groups"]["child"]["accuracy"]["value"] == 1.0
    assert report["groups"]["adult"]["accuracy"]["value"] == pytest.approx(5 / 15)
    assert report["groups"]["adult"]["sensitivity"]["NORMAL"]["value"] == 0.0
    assert report["groups"][UNGROUPED]["images"] == 1 and set(report["groups"][UNGROUPED]["sensitivity"]) == {"NORMAL"}
    assert report["worst_group"] == "adult"
    text = subgroups_markdown({"custom": report}, list(CLASSES), "site")
    assert "worst group: adult" in text and "| child | 15 |" in text


def test_a_missing_file_or_column_is_one_line(tmp_path, groups_csv):
    with pytest.raises(PipelineError, match="no such file"):
        load_groups(GroupsParams(csv=str(tmp_path / "nope.csv")))
    with pytest.raises(PipelineError, match="has no column 'source_repo'"):
        load_groups(GroupsParams(csv=str(groups_csv)))


@pytest.mark.skipif(not MANIFEST.is_file(), reason="../shared/data/cxr3/manifest.csv not present")
def test_the_cxr3_manifest_works_as_it_is():
    groups = load_groups(GroupsParams(csv=str(MANIFEST)))
    assert groups["test/COVID19/COVID19_000000.jpg"] == "rtchanon/Machine-Learning-for-COVID-19-detection-from-chest-X-RAYS"
