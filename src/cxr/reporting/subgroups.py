"""Scores per subgroup of the test images (source collection, site, age band, view), and the worst group.

A model can be accurate overall and fail one hospital's films, which is what a deployment
elsewhere meets first; a pooled score hides it. The groups come from a CSV the user names
(``evaluate.groups``), so any column of a manifest can be audited without retraining.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cxr.approaches import DISPLAY_NAMES
from cxr.errors import PipelineError, first_line
from cxr.params import GroupsParams
from cxr.reporting import stats
from cxr.reporting.comparison import interval

UNGROUPED = "(not in the groups CSV)"
log = logging.getLogger(__name__)


def _relative(path: str) -> str:
    """A data set path without its leading ``Data/``, as the split tables write it."""
    return path.removeprefix("./").removeprefix("Data/")


def _read_table(path: Path, settings: GroupsParams) -> pd.DataFrame:
    """The path and group columns of the CSV as text; any reading problem is one line naming the file."""
    wanted = (settings.path_column, settings.group_column)
    try:
        table = pd.read_csv(path, dtype=str, encoding="utf-8", usecols=lambda column: column in wanted)
    except pd.errors.EmptyDataError:
        raise PipelineError(f"evaluate.groups: {path} is empty") from None
    except UnicodeDecodeError:
        raise PipelineError(f"evaluate.groups: {path} is not UTF-8 text") from None
    except pd.errors.ParserError as err:
        raise PipelineError(f"evaluate.groups: {path} is not a readable CSV: {first_line(err)}") from None
    except OSError as err:
        raise PipelineError(f"evaluate.groups: cannot read {path}: {err.strerror or first_line(err)}") from None
    for column in wanted:
        if column not in table.columns:
            raise PipelineError(f"evaluate.groups: {path} has no column {column!r}")
    return table.dropna(subset=[settings.path_column])


def load_groups(settings: GroupsParams) -> pd.Series:
    """The group of each image path (leading ``Data/`` dropped), from the CSV ``evaluate.groups`` names.

    A path listed twice (also as ``Data/x`` and ``x``) with the same group counts once; with two
    different groups it is an error, since the image's group would depend on row order.
    """
    path = Path(settings.csv).expanduser()
    if not path.is_file():
        raise PipelineError(f"evaluate.groups.csv: no such file {path}")
    table = _read_table(path, settings)
    if table.empty:
        raise PipelineError(f"evaluate.groups: {path} has no rows")
    rows = pd.DataFrame({"path": table[settings.path_column].map(_relative),
                         "group": table[settings.group_column].fillna("")}).drop_duplicates()
    clash = rows["path"].duplicated(keep=False)
    if clash.any():
        image = rows.loc[clash, "path"].iloc[0]
        first, second = rows.loc[rows["path"] == image, "group"].iloc[:2]
        raise PipelineError(f"evaluate.groups: {path} lists {image!r} twice with different groups: {first!r} and {second!r}")
    return pd.Series(rows["group"].to_numpy(), index=rows["path"].to_numpy())


def group_of(paths: pd.Series, groups: pd.Series) -> pd.Series:
    """Each test image's group (:data:`UNGROUPED` where the CSV has no row for it), paths matched without ``Data/``."""
    return paths.map(_relative).map(groups).fillna(UNGROUPED)


def log_matches(settings: GroupsParams, groups: pd.Series, paths: pd.Series) -> int:
    """Log how many test images have a row in the groups CSV; warn when most have none. Returns the count.

    Unmatched images all fall into one :data:`UNGROUPED` group, so a path column that does not
    look like the split's paths would otherwise make a report of one group without a word.
    """
    matched = int(paths.map(_relative).isin(groups.index).sum())
    log.info("evaluate.groups: %d of %d test images matched a row of %s", matched, len(paths), settings.csv)
    if len(paths) - matched > len(paths) / 2:
        log.warning("evaluate.groups: %d of %d test images match no row of %s; its column %r should hold paths like %r",
                    len(paths) - matched, len(paths), settings.csv, settings.path_column,
                    _relative(str(paths.iloc[0])))
    return matched


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def _markdown_text(text: str) -> str:
    """``text`` as one Markdown table cell: line breaks become spaces and markup characters are escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


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
        scores = {str(group): _group_scores(part, classes, resamples, seed)
                  for group, part in frame.groupby(group_of(frame["path"], groups).to_numpy(), sort=True)}
        rankable = {group: entry for group, entry in scores.items() if entry["images"] >= 10} or scores
        worst = min(rankable, key=lambda group: rankable[group]["accuracy"]["value"])
        report[model] = {"groups": scores, "worst_group": worst}
    return report


def _ci(entry: Mapping[str, float]) -> str:
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def subgroups_markdown(report: Mapping[str, Any], classes: Sequence[str], column: str) -> str:
    """One table per model: group, images, accuracy and each class's sensitivity with intervals; worst group named."""
    lines = ["## Subgroups", "", f"Test images grouped by {_markdown_text(column)}; 95% intervals by stratified bootstrap.", ""]
    for model, entry in report.items():
        lines += [f"### {DISPLAY_NAMES.get(model, model)} (worst group: {_markdown_text(entry['worst_group'])})", "",
                  "| Group | Images | Accuracy | " + " | ".join(f"{name} sensitivity" for name in classes) + " |",
                  "|---|---:|---|" + "---|" * len(classes)]
        for group, scores in entry["groups"].items():
            cells = [_ci(scores["sensitivity"][name]) if name in scores["sensitivity"] else "-" for name in classes]
            lines.append(f"| {_markdown_text(group)} | {scores['images']} | {_ci(scores['accuracy'])} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
