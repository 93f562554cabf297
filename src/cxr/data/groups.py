"""The groups CSV: which collection (site, age band, view) each image comes from.

Groups are an input of the whole pipeline, not only of the report: the split stage reads
them to hold whole collections out of training (``split.unseen_groups``), evaluate checks
the CSV and logs how many test images it covers, and compare scores each group. The
params section is top-level ``groups``; one loader here serves all three stages.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import pandas as pd

from cxr.errors import PipelineError, first_line
from cxr.params import GroupsParams

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
        raise PipelineError(f"groups: {path} is empty") from None
    except UnicodeDecodeError:
        raise PipelineError(f"groups: {path} is not UTF-8 text") from None
    except pd.errors.ParserError as err:
        raise PipelineError(f"groups: {path} is not a readable CSV: {first_line(err)}") from None
    except OSError as err:
        raise PipelineError(f"groups: cannot read {path}: {err.strerror or first_line(err)}") from None
    for column in wanted:
        if column not in table.columns:
            raise PipelineError(f"groups: {path} has no column {column!r}")
    return table.dropna(subset=[settings.path_column])


def load_groups(settings: GroupsParams) -> pd.Series:
    """The group of each image path (leading ``Data/`` dropped), from the CSV ``groups.csv`` names.

    A path listed twice (also as ``Data/x`` and ``x``) with the same group counts once; with two
    different groups it is an error, since the image's group would depend on row order.
    """
    path = Path(str(settings.csv)).expanduser()
    if not path.is_file():
        raise PipelineError(f"groups.csv: no such file {path}")
    table = _read_table(path, settings)
    if table.empty:
        raise PipelineError(f"groups: {path} has no rows")
    rows = pd.DataFrame({"path": table[settings.path_column].map(_relative),
                         "group": table[settings.group_column].fillna("")}).drop_duplicates()
    clash = rows["path"].duplicated(keep=False)
    if clash.any():
        image = rows.loc[clash, "path"].iloc[0]
        first, second = rows.loc[rows["path"] == image, "group"].iloc[:2]
        raise PipelineError(f"groups: {path} lists {image!r} twice with different groups: {first!r} and {second!r}")
    return pd.Series(rows["group"].to_numpy(), index=rows["path"].to_numpy())


def group_of(paths: pd.Series, groups: pd.Series) -> pd.Series:
    """Each image's group (:data:`UNGROUPED` where the CSV has no row for it), paths matched without ``Data/``."""
    return paths.map(_relative).map(groups).fillna(UNGROUPED)


def worst_group(accuracy: Mapping[str, float], images: Mapping[str, int], min_images: int) -> str:
    """The group with the lowest accuracy among those with at least ``min_images`` images (any group when none has).

    One rule for the epoch that ``select: worst_group`` keeps and for the report's worst group:
    a group of a handful of images swings by whole tenths on one film, too noisy to rank.
    """
    ranked = [group for group in accuracy if images[group] >= min_images] or list(accuracy)
    return min(ranked, key=accuracy.__getitem__)


def log_matches(settings: GroupsParams, groups: pd.Series, paths: pd.Series, split: str = "test") -> int:
    """Log how many images of ``split`` have a row in the groups CSV; warn when most have none. Returns the count.

    Unmatched images all fall into one :data:`UNGROUPED` group, so a path column that does not
    look like the split's paths would otherwise make a report of one group without a word.
    """
    matched = int(paths.map(_relative).isin(groups.index).sum())
    log.info("groups: %d of %d %s images matched a row of %s", matched, len(paths), split, settings.csv)
    if len(paths) - matched > len(paths) / 2:
        log.warning("groups: %d of %d %s images match no row of %s; its column %r should hold paths like %r",
                    len(paths) - matched, len(paths), split, settings.csv, settings.path_column,
                    _relative(str(paths.iloc[0])))
    return matched


def check_known(names: list[str], groups: pd.Series, key: str) -> None:
    """Every name in ``names`` is a group of the CSV; else one line naming ``key`` and the groups that exist."""
    known = sorted(set(groups))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise PipelineError(f"params.yaml: {key} lists {unknown[0]!r}, not a group of the groups CSV; "
                            f"its groups: {', '.join(known)}")


def unseen_images(frame: pd.DataFrame, groups: pd.Series, unseen: Collection[str]) -> pd.DataFrame:
    """The rows of ``frame`` whose group (from :func:`load_groups`) is in ``unseen``, with a ``group`` column."""
    tagged = frame.assign(group=group_of(frame["path"], groups))
    return tagged[tagged["group"].isin(list(unseen))].reset_index(drop=True)


def unseen_report(held_out: pd.DataFrame, test: pd.DataFrame, groups: pd.Series,
                  unseen: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per unseen group: training images removed (from train and val) and test images that remain scored."""
    test_group = group_of(test["path"], groups)
    return {name: {"removed_from_train_val": int((held_out["group"] == name).sum()),
                   "test_images": int((test_group == name).sum())} for name in unseen}
