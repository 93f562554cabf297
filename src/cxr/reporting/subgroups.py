"""Scores per subgroup of the test images (source collection, site, age band, view), and the worst group.

A model can be accurate overall and fail one hospital's films, which is what a deployment
elsewhere meets first; a pooled score hides it. The groups come from a CSV the user names
(``evaluate.groups``), so any column of a manifest can be audited without retraining.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cxr.approaches import DISPLAY_NAMES
from cxr.errors import PipelineError
from cxr.params import GroupsParams
from cxr.reporting import stats
from cxr.reporting.comparison import interval

UNGROUPED = "(not in the groups CSV)"


def _relative(path: str) -> str:
    """A data set path without its leading ``Data/``, as the split tables write it."""
    return path.removeprefix("./").removeprefix("Data/")


def load_groups(settings: GroupsParams) -> pd.Series:
    """The group of each image path (leading ``Data/`` dropped), from the CSV ``evaluate.groups`` names."""
    path = Path(settings.csv).expanduser()
    if not path.is_file():
        raise PipelineError(f"evaluate.groups.csv: no such file {path}")
    table = pd.read_csv(path, dtype=str, usecols=lambda column: column in (settings.path_column, settings.group_column))
    for column in (settings.path_column, settings.group_column):
        if column not in table.columns:
            raise PipelineError(f"evaluate.groups: {path} has no column {column!r}")
    table = table.dropna(subset=[settings.path_column])
    return pd.Series(table[settings.group_column].fillna("").to_numpy(),
                     index=table[settings.path_column].map(_relative).to_numpy())


def _group_scores(frame: pd.DataFrame, classes: Sequence[str], resamples: int, seed: int) -> dict[str, Any]:
    y_true = stats.encode_labels(frame["label"], classes)
    y_pred = stats.encode_labels(frame["predicted"], classes)
    present = [(i, name) for i, name in enumerate(classes) if (y_true == i).any()]
    return {
        "images": int(len(frame)),
        "accuracy": interval(y_true, y_pred, stats.accuracy, resamples, seed),
        "sensitivity": {name: interval(y_true, y_pred, stats.class_recall(i), resamples, seed) for i, name in present},
    }


def subgroup_report(frames: Mapping[str, pd.DataFrame], groups: pd.Series, classes: Sequence[str],
                    resamples: int, seed: int) -> dict[str, Any]:
    """Per model and group: images, accuracy and per-class sensitivity with 95% intervals, and the worst group.

    Test images the CSV does not list form one more group, so nothing silently drops out.
    The worst group is the one with the lowest accuracy among groups of at least 10 images
    (smaller ones are reported but too noisy to rank).
    """
    report: dict[str, Any] = {}
    for model, frame in frames.items():
        group_of = frame["path"].map(_relative).map(groups).fillna(UNGROUPED)
        scores = {str(group): _group_scores(part, classes, resamples, seed)
                  for group, part in frame.groupby(group_of.to_numpy(), sort=True)}
        rankable = {group: entry for group, entry in scores.items() if entry["images"] >= 10} or scores
        worst = min(rankable, key=lambda group: rankable[group]["accuracy"]["value"])
        report[model] = {"groups": scores, "worst_group": worst}
    return report


def _ci(entry: Mapping[str, float]) -> str:
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def subgroups_markdown(report: Mapping[str, Any], classes: Sequence[str], column: str) -> str:
    """One table per model: group, images, accuracy and each class's sensitivity with intervals; worst group named."""
    lines = ["## Subgroups", "", f"Test images grouped by `{column}`; 95% intervals by stratified bootstrap.", ""]
    for model, entry in report.items():
        lines += [f"### {DISPLAY_NAMES.get(model, model)} (worst group: {entry['worst_group']})", "",
                  "| Group | Images | Accuracy | " + " | ".join(f"{name} sensitivity" for name in classes) + " |",
                  "|---|---:|---|" + "---|" * len(classes)]
        for group, scores in entry["groups"].items():
            cells = [_ci(scores["sensitivity"][name]) if name in scores["sensitivity"] else "-" for name in classes]
            lines.append(f"| {group} | {scores['images']} | {_ci(scores['accuracy'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
