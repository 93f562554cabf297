"""Subgroup report: per-group scores from a user's CSV, paths matched with or without ``Data/``, the worst group named,
threshold-free AUCs per group checked against scikit-learn, and unseen groups marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr.data.groups import UNGROUPED, load_groups
from cxr.errors import PipelineError
from cxr.params import CLASSES, GroupsParams
from cxr.reporting.subgroups import pneumonia_vs_normal, rank_auc, subgroup_report, subgroups_markdown

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


# --- threshold-free scores: ROC AUC per group and class, and pneumonia vs normal ------------------------------


def scored_frame(seed: int, sizes: dict[str, int]) -> tuple[pd.DataFrame, pd.Series]:
    """Random probabilities (informative to a different degree per group) for groups of the given sizes."""
    rng = np.random.default_rng(seed)
    paths, labels, rows, group = [], [], [], []
    for g, (name, size) in enumerate(sizes.items()):
        truth = rng.integers(0, 3, size)
        logits = rng.normal(size=(size, 3)) + (g + 0.5) * np.eye(3)[truth]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        paths += [f"test/{name}_{i}.png" for i in range(size)]
        labels += [CLASSES[t] for t in truth]
        rows.append(probs)
        group += [name] * size
    probs = np.concatenate(rows)
    frame = pd.DataFrame({"path": paths, "label": labels, "predicted": [CLASSES[k] for k in probs.argmax(axis=1)]})
    frame = frame.join(pd.DataFrame(probs, columns=[f"prob_{c}" for c in CLASSES]))
    return frame, pd.Series(group, index=paths)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_aucs_match_sklearn_on_each_group(seed):
    frame, groups = scored_frame(seed, {"a": 30, "b": 55, "c": 80})
    report = subgroup_report({"custom": frame}, groups, list(CLASSES), 50, 0)["custom"]["groups"]
    for name in ("a", "b", "c"):
        part = frame[(groups.reindex(frame["path"]) == name).to_numpy()]
        for label in CLASSES:
            expected = roc_auc_score(part["label"] == label, part[f"prob_{label}"])
            assert report[name]["roc_auc"][label]["value"] == pytest.approx(expected, abs=1e-6)
        pair = part[part["label"].isin(["NORMAL", "PNEUMONIA"])]
        ratio = pair["prob_PNEUMONIA"] / (pair["prob_PNEUMONIA"] + pair["prob_NORMAL"])
        expected = roc_auc_score(pair["label"] == "PNEUMONIA", ratio)
        assert report[name]["pneumonia_vs_normal_auc"]["value"] == pytest.approx(expected, abs=1e-6)
        for entry in [*report[name]["roc_auc"].values(), report[name]["pneumonia_vs_normal_auc"]]:
            assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]


def test_rank_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        positive = rng.random(40) < 0.4
        score = rng.integers(0, 5, 40) / 4  # many ties
        if positive.any() and not positive.all():
            assert rank_auc(positive, score) == pytest.approx(roc_auc_score(positive, score), abs=1e-12)


def test_a_perfect_ranking_has_the_interval_1_1_and_the_interval_narrows_with_more_images():
    frame, groups = scored_frame(0, {"small": 60, "large": 2400})
    perfect = frame.copy()
    perfect[[f"prob_{c}" for c in CLASSES]] = np.eye(3)[[CLASSES.index(label) for label in frame["label"]]] * 0.8 + 0.1
    report = subgroup_report({"perfect": perfect, "noisy": frame}, groups, list(CLASSES), 300, 0)
    for name in ("small", "large"):
        for entry in [*report["perfect"]["groups"][name]["roc_auc"].values(),
                      report["perfect"]["groups"][name]["pneumonia_vs_normal_auc"]]:
            assert (entry["value"], entry["ci_low"], entry["ci_high"]) == (1.0, 1.0, 1.0)
    noisy = report["noisy"]["groups"]
    for label in CLASSES:
        small, large = noisy["small"]["roc_auc"][label], noisy["large"]["roc_auc"][label]
        assert large["ci_high"] - large["ci_low"] < (small["ci_high"] - small["ci_low"]) / 2


def test_an_absent_class_or_a_one_class_group_gives_no_auc_and_a_dash():
    frame = predictions(["test/a0.jpg", "test/a1.jpg", "test/a2.jpg", "test/b0.jpg", "test/b1.jpg"],
                        ["NORMAL", "PNEUMONIA", "NORMAL", "COVID19", "COVID19"],
                        ["NORMAL", "NORMAL", "PNEUMONIA", "COVID19", "NORMAL"])
    groups = pd.Series(["a", "a", "a", "b", "b"], index=frame["path"])
    report = subgroup_report({"custom": frame}, groups, list(CLASSES), 50, 0)

    a, b = report["custom"]["groups"]["a"], report["custom"]["groups"]["b"]
    assert a["roc_auc"]["COVID19"] is None and a["roc_auc"]["NORMAL"] is not None
    assert a["pneumonia_vs_normal_auc"]["value"] == pytest.approx(
        roc_auc_score([False, True, False], [0.0, 0.0, 1.0]))  # one-hot probabilities: P(P) / (P(P) + P(N))
    assert b["roc_auc"] == dict.fromkeys(CLASSES) and b["pneumonia_vs_normal_auc"] is None
    text = subgroups_markdown(report, list(CLASSES), "site")
    row_b = next(line for line in text.splitlines() if line.startswith("| b |"))
    assert row_b.endswith("| - | - | - | - |")


@pytest.mark.parametrize(("min_images", "worst"), [(1, "tiny"), (3, "mid"), (5, "big"), (6, "tiny")])
def test_the_worst_group_is_ranked_among_groups_of_at_least_min_images(min_images, worst):
    """tiny (2 images, 0.5 accurate) < mid (3, 0.667) < big (5, 0.8); none with 6 images: all are ranked."""
    sizes, right = {"tiny": 2, "mid": 3, "big": 5}, {"tiny": 1, "mid": 2, "big": 4}
    paths = [f"test/{name}{i}.jpg" for name, n in sizes.items() for i in range(n)]
    labels = ["NORMAL"] * len(paths)
    predicted = [("NORMAL" if i < right[name] else "PNEUMONIA") for name, n in sizes.items() for i in range(n)]
    groups = pd.Series([name for name, n in sizes.items() for _ in range(n)], index=paths)
    report = subgroup_report({"custom": predictions(paths, labels, predicted)}, groups, list(CLASSES), 20, 0,
                             min_images=min_images)
    assert report["custom"]["worst_group"] == worst


def test_the_pair_score_is_the_share_of_pneumonia_in_the_two():
    frame = predictions(["x", "y", "z"], ["NORMAL", "PNEUMONIA", "COVID19"], ["NORMAL", "NORMAL", "COVID19"])
    frame[["prob_COVID19", "prob_NORMAL", "prob_PNEUMONIA"]] = [[0.5, 0.4, 0.1], [0.0, 0.0, 0.0], [0.9, 0.05, 0.05]]
    truth, score = pneumonia_vs_normal(frame, list(CLASSES))
    assert truth.tolist() == [False, True]
    assert score.tolist() == pytest.approx([0.2, 0.5])  # 0.1 / 0.5; no mass on either: 0.5


# --- unseen groups --------------------------------------------------------------------------------------------


def test_unseen_groups_are_marked_in_the_json_and_the_table(groups_csv):
    frame, _ = scored_frame(4, {"adult": 15, "child": 15})
    frame["path"] = [f"test/{CLASSES[i % 3]}/{site}_{i // 3}.jpg" for site in ("adult", "child") for i in range(15)]
    groups = load_groups(GroupsParams(csv=str(groups_csv), group_column="site"))
    report = subgroup_report({"custom": frame}, groups, list(CLASSES), 50, 0, unseen=["adult"])

    assert report["custom"]["groups"]["adult"]["unseen"] is True
    assert report["custom"]["groups"]["child"]["unseen"] is False
    text = subgroups_markdown(report, list(CLASSES), "site")
    assert "| adult *unseen* | 15 |" in text and "| child | 15 |" in text
