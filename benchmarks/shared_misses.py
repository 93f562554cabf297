"""The focus collection's films that every model gets wrong: the list to hand a radiologist.

A film missed by one model may be a hard film; a film that models trained differently (other
``balance``, other input size) all call the other class, with confidence, is either beyond what the
pixels show or wrongly labelled. NIH ChestX-ray8's labels are text-mined from reports, so the list
names each film's original file (``source_path`` in the manifest) for a reader to check against
the image itself. Nothing here decides which of the two it is.

``python benchmarks/shared_misses.py --scores A/scores.json B/scores.json [--split test]
[--manifest cxr3/manifest.csv]`` reads the focus collection's ``films`` that
``benchmarks/training_options.py`` wrote and prints the films every (option, file) pair missed,
least confident first, with each model's probability of the labelled class.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from cxr.console import run
from cxr.data.groups import load_groups
from cxr.errors import PipelineError
from cxr.evaluation.predictions import PROB_PREFIX
from cxr.files import read_json
from cxr.params import GroupsParams


def focus_films(path: Path, option: str, splits: dict, split: str) -> list[dict]:
    """One scored option's films of its focus collection on ``split``; older score files name the fix."""
    entry = splits.get(split, {})
    if "films" not in entry or "focus_group" not in entry:
        raise PipelineError(f"{path}: option {option} has no scored focus films for {split!r}; "
                            "rescore it with benchmarks/training_options.py")
    return [film for film in entry["films"] if film["group"] == entry["focus_group"]]


def misses_by_model(score_files: list[Path], split: str) -> dict[str, list[dict]]:
    """Each model's misclassified focus films on ``split`` (records of path, label, probabilities), keyed
    ``<folder>/<option>`` so that two files scoring the same option stay apart."""
    models = {}
    for path in score_files:
        for option, splits in read_json(path).items():
            films = focus_films(path, option, splits, split)
            models[f"{path.parent.name}/{option}"] = [film for film in films if film["predicted"] != film["label"]]
    return models


def shared_misses(models: dict[str, list[dict]]) -> pd.DataFrame:
    """Films every model misclassified: path, label, each model's probability of the label, and their maximum.

    Sorted by that maximum, so the films all models reject most confidently come first.
    """
    if not models:
        raise PipelineError("no models given")
    probability_of_label = {
        name: pd.Series({film["path"]: film[PROB_PREFIX + film["label"]] for film in films}, dtype=float)
        for name, films in models.items()}
    shared = pd.concat(probability_of_label, axis=1, join="inner")
    labels = {film["path"]: film["label"] for films in models.values() for film in films}
    shared.insert(0, "label", [labels[path] for path in shared.index])
    shared["max"] = shared[list(models)].max(axis=1)
    return shared.sort_values(["max", "label"]).rename_axis("path").reset_index()


def markdown(shared: pd.DataFrame, models: list[str], source: pd.Series) -> str:
    """One row per film, with its original file (``source``: path -> source_path, may be empty) beside it."""
    lines = [f"{len(shared)} films misclassified by all {len(models)} models; each model's probability of the label:",
             "", "| film | label | original file | " + " | ".join(models) + " |",
             "|---|---|---|" + "---:|" * len(models)]
    for _, row in shared.iterrows():
        probabilities = " | ".join(f"{row[model]:.3f}" for model in models)
        lines.append(f"| {row['path']} | {row['label']} | {source.get(row['path'], '-')} | {probabilities} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", type=Path, nargs="+", required=True, help="training_options.py scores.json files")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--manifest", type=Path, help="CSV with file and source_path columns (cxr3/manifest.csv)")
    args = parser.parse_args(argv)
    for path in args.scores:
        if not path.is_file():
            raise PipelineError(f"{path}: no such file")
    models = misses_by_model(args.scores, args.split)
    shared = shared_misses(models)
    source = (load_groups(GroupsParams(csv=str(args.manifest), group_column="source_path")) if args.manifest
              else pd.Series(dtype=str))
    print(markdown(shared, list(models), source))
    return shared


if __name__ == "__main__":
    run(main)
