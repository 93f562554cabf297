"""Scores per subgroup of the test images (source collection, site, age band, view), and the worst group.

A model can be accurate overall and fail one hospital's films, which is what a deployment
elsewhere meets first; a pooled score hides it. The groups come from a CSV the user names
(top-level ``groups``, loaded by :mod:`cxr.data.groups`), so any column of a manifest can be
audited without retraining. Beside accuracy and sensitivity, which depend on the argmax
threshold, each group gets threshold-free ROC AUCs: a group whose images the model ranks well
but miscalibrates differs from one it cannot tell apart. Groups in ``split.unseen_groups``
are marked *unseen*: their images never reached training.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from cxr import stats
from cxr.approaches import DISPLAY_NAMES
from cxr.data.groups import group_of, worst_group
from cxr.evaluation.predictions import probabilities_of
from cxr.reporting.comparison import interval

PAIR = ("PNEUMONIA", "NORMAL")  # the pneumonia-vs-normal AUC: positive class, negative class
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def _markdown_text(text: str) -> str:
    """``text`` as one Markdown table cell: line breaks become spaces and markup characters are escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for the boolean ``positive`` (Mann-Whitney U over average ranks; ties count half).

    Equal to ``sklearn.metrics.roc_auc_score`` (tested) without its per-call input checks, which
    dominate the bootstrap's thousand resamples per group, class and model.
    """
    ranks = rankdata(score)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auc_of_column(column: int) -> stats.Metric:
    """Metric: AUC of probability column ``column`` for truth == ``column`` (rows of y_pred are probabilities)."""

    def auc(y_true: np.ndarray, probs: np.ndarray) -> float:
        return rank_auc(np.asarray(y_true) == column, np.asarray(probs)[:, column])

    return auc


def _auc_interval(positive: np.ndarray, probs: np.ndarray, column: int, resamples: int, seed: int) -> dict[str, float] | None:
    """AUC of ``probs[:, column]`` for ``positive`` with its stratified-bootstrap interval; None unless both sides occur.

    The bootstrap resamples positives and negatives each within themselves, so every resample
    has both and the AUC is always defined.
    """
    if positive.all() or not positive.any():
        return None
    return interval(np.where(positive, column, -1), probs, _auc_of_column(column), resamples, seed)


def pneumonia_vs_normal(frame: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Truth (is PNEUMONIA) and score of the images whose truth is NORMAL or PNEUMONIA.

    The score is P(PNEUMONIA) / (P(PNEUMONIA) + P(NORMAL)), the model's answer to "of these
    two, which?": P(PNEUMONIA) alone would also move with the mass the model puts on COVID19,
    so a group whose films look COVID-like would rank worse without the pneumonia-normal
    decision being any worse. Where both probabilities are 0 the score is 0.5 (no preference).
    """
    positive, negative = (classes.index(name) for name in PAIR)
    keep = frame["label"].isin(PAIR).to_numpy()
    probs = probabilities_of(frame, classes)[keep]
    total = probs[:, positive] + probs[:, negative]
    score = np.divide(probs[:, positive], total, out=np.full(len(total), 0.5), where=total > 0)
    return (frame["label"].to_numpy()[keep] == PAIR[0]), score


def _group_scores(frame: pd.DataFrame, classes: Sequence[str], resamples: int, seed: int) -> dict[str, Any]:
    y_true = stats.encode_labels(frame["label"], classes)
    y_pred = stats.encode_labels(frame["predicted"], classes)
    probs = probabilities_of(frame, classes)
    present = [(i, name) for i, name in enumerate(classes) if (y_true == i).any()]
    pair_truth, pair_score = pneumonia_vs_normal(frame, classes)
    return {
        "images": int(len(frame)),
        "accuracy": interval(y_true, y_pred, stats.accuracy, resamples, seed),
        "sensitivity": {name: interval(y_true, y_pred, stats.class_recall(i), resamples, seed) for i, name in present},
        "roc_auc": {name: _auc_interval(y_true == i, probs, i, resamples, seed) for i, name in enumerate(classes)},
        "pneumonia_vs_normal_auc": _auc_interval(pair_truth, pair_score[:, None], 0, resamples, seed),
    }


def subgroup_report(frames: Mapping[str, pd.DataFrame], groups: pd.Series, classes: Sequence[str],
                    resamples: int, seed: int, unseen: Collection[str] = (), min_images: int = 20) -> dict[str, Any]:
    """Per model and group: images, accuracy, per-class sensitivity and ROC AUC, and the pneumonia-vs-normal AUC,
    each with its 95% interval (None where a class is absent); whether training saw the group; the worst group.

    Test images the CSV does not list form one more group, so nothing silently drops out.
    The worst group is the one with the lowest accuracy among groups of at least ``min_images``
    images (``groups.min_images``; smaller ones are reported but too noisy to rank), the rule
    ``select: worst_group`` chooses epochs by (:func:`cxr.data.groups.worst_group`).
    """
    report: dict[str, Any] = {}
    for model, frame in frames.items():
        scores = {str(group): _group_scores(part, classes, resamples, seed) | {"unseen": group in unseen}
                  for group, part in frame.groupby(group_of(frame["path"], groups).to_numpy(), sort=True)}
        worst = worst_group({group: entry["accuracy"]["value"] for group, entry in scores.items()},
                            {group: entry["images"] for group, entry in scores.items()}, min_images)
        report[model] = {"groups": scores, "worst_group": worst}
    return report


def _ci(entry: Mapping[str, float] | None) -> str:
    """A score with its interval as table text; "-" where the score is undefined."""
    return "-" if entry is None else f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def subgroups_markdown(report: Mapping[str, Any], classes: Sequence[str], column: str) -> str:
    """One table per model: group (marked *unseen* when training never saw it), images, accuracy, each class's
    sensitivity and ROC AUC, and the pneumonia-vs-normal AUC with intervals; worst group named."""
    lines = ["## Subgroups", "", f"Test images grouped by {_markdown_text(column)}; 95% intervals by stratified bootstrap. "
             "*unseen*: a group kept out of training (split.unseen_groups). AUCs are one-vs-rest; "
             "P vs N: pneumonia-vs-normal AUC on the images that are one of the two; - : undefined (class absent).", ""]
    header = ([f"{name} sensitivity" for name in classes] + [f"{name} AUC" for name in classes] + ["P vs N AUC"])
    for model, entry in report.items():
        lines += [f"### {DISPLAY_NAMES.get(model, model)} (worst group: {_markdown_text(entry['worst_group'])})", "",
                  "| Group | Images | Accuracy | " + " | ".join(header) + " |",
                  "|---|---:|---|" + "---|" * len(header)]
        for group, scores in entry["groups"].items():
            cells = ([_ci(scores["sensitivity"].get(name)) for name in classes]
                     + [_ci(scores["roc_auc"][name]) for name in classes] + [_ci(scores["pneumonia_vs_normal_auc"])])
            name = _markdown_text(group) + (" *unseen*" if scores["unseen"] else "")
            lines.append(f"| {name} | {scores['images']} | {_ci(scores['accuracy'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
