"""How many of the focus collection's PNEUMONIA labels would have to be wrong for a model to meet issue 29's goal.

The goal (NIH pneumonia-vs-normal AUC >= 0.90, and PNEUMONIA sensitivity >= 0.70 at NORMAL specificity
>= 0.85) is measured against labels text-mined from reports. A film labelled PNEUMONIA that shows no
pneumonia belongs with the NORMAL films, and a model that ranks it low is right about it. So the
question "is the model or are the labels the limit?" has a countable form: the fewest such label
errors under which this model's ranking would meet the goal.

Relabelling the k films the model ranks lowest is the most favourable choice of k films: it takes out
the positives that beat the fewest negatives, and the new negatives sit below every remaining
positive (tested against every subset). So when the count is k, fewer than k wrong PNEUMONIA labels
cannot be enough for this model, whichever films they are; whether k of them are wrong is for a
radiologist to read, and the films are listed with their original files for that. Nothing here
decides it.

The same count at the model's own decision rule (the most probable class, one rule for every
collection, as the goal asks) says how much of the gap is where the threshold sits rather than the
ranking: there, relabelling a miss is all that can help.

With several score files the models' equal-weight ensemble (the mean of their probabilities, as the
pipeline's ensemble) is counted too.

``python benchmarks/label_errors_needed.py --scores A/scores.json [B/scores.json ...] [--split test]
[--manifest cxr3/manifest.csv]`` reads the focus collection's ``films`` that ``benchmarks/training_options.py`` wrote
and prints one row per model and split, then the films to read for the last row of ``--split``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cxr import stats
from cxr.console import run
from cxr.data.groups import load_groups
from cxr.errors import PipelineError
from cxr.evaluation.ensemble import ensemble_frame
from cxr.evaluation.predictions import PROB_PREFIX
from cxr.files import read_json
from cxr.params import GroupsParams
from cxr.reporting.subgroups import PAIR, pneumonia_vs_normal, rank_auc

AUC_GOAL, SENSITIVITY_GOAL, SPECIFICITY = 0.90, 0.70, 0.85  # issue 29's goal on the focus collection
SPLITS = ("val", "test")
ENSEMBLE = "ensemble (mean probabilities)"

Goal = Callable[[np.ndarray, np.ndarray], bool]


def auc_reached(positive: np.ndarray, score: np.ndarray) -> bool:
    return rank_auc(positive, score) >= AUC_GOAL


def sensitivity_reached(positive: np.ndarray, score: np.ndarray) -> bool:
    return stats.sensitivity_at_specificity(positive, score, SPECIFICITY) >= SENSITIVITY_GOAL


def both_reached(positive: np.ndarray, score: np.ndarray) -> bool:
    return auc_reached(positive, score) and sensitivity_reached(positive, score)


def positives_lowest_first(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Indices of the positives, lowest score first (ties in position order)."""
    return np.flatnonzero(positive)[np.argsort(score[positive], kind="stable")]


def lowest_relabelled(positive: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """``positive`` with the ``k`` lowest-scored positives made negative."""
    relabelled = positive.copy()
    relabelled[positives_lowest_first(positive, score)[:k]] = False
    return relabelled


def fewest_relabelled(positive: np.ndarray, score: np.ndarray, goal: Goal) -> int | None:
    """The smallest k for which ``goal`` holds once the k lowest-scored positives are negatives (None: no k does).

    One positive always stays, so every AUC and sensitivity is defined.
    """
    for k in range(int(positive.sum())):
        if goal(lowest_relabelled(positive, score, k), score):
            return k
    return None


def fewest_for_own_rule(frame: pd.DataFrame) -> int | None:
    """The fewest missed PNEUMONIA films whose relabelling lets the model's own predictions meet the goal.

    At the pipeline's rule (the most probable class) sensitivity is the share of PNEUMONIA films
    predicted PNEUMONIA and specificity the share of NORMAL films not predicted PNEUMONIA. A relabelled
    miss leaves the positives and joins the negatives it is not called PNEUMONIA among; which misses
    does not matter, and relabelling a hit never helps.
    """
    pair = frame[frame["label"].isin(PAIR)]
    called = (pair["predicted"] == PAIR[0]).to_numpy()
    positive = (pair["label"] == PAIR[0]).to_numpy()
    hits, misses = int((called & positive).sum()), int((~called & positive).sum())
    negatives, kept = int((~positive).sum()), int((~called & ~positive).sum())
    for k in range(misses + 1):
        if hits / (hits + misses - k) >= SENSITIVITY_GOAL and (kept + k) / (negatives + k) >= SPECIFICITY:
            return k
    return None


def focus_frames(score_files: list[Path], split: str) -> dict[str, pd.DataFrame]:
    """Each scored option's focus films on ``split`` as a predictions table, keyed ``<folder>/<option>``."""
    frames = {}
    for path in score_files:
        for option, splits in read_json(path).items():
            entry = splits.get(split, {})
            if "films" not in entry or "focus_group" not in entry:
                raise PipelineError(f"{path}: option {option} has no scored focus films for {split!r}; "
                                    "rescore it with benchmarks/training_options.py")
            frame = pd.DataFrame([film for film in entry["films"] if film["group"] == entry["focus_group"]])
            if not frame.empty:
                frames[f"{path.parent.name}/{option}"] = frame.sort_values("path", ignore_index=True)
    if len(frames) > 1:
        frames[ENSEMBLE] = ensemble_frame(frames, classes_of(frames), {name: 1 / len(frames) for name in frames})
    return frames


def classes_of(frames: dict[str, pd.DataFrame]) -> list[str]:
    """The class names, from the probability columns of the first table."""
    frame = next(iter(frames.values()))
    return [column.removeprefix(PROB_PREFIX) for column in frame.columns if column.startswith(PROB_PREFIX)]


def pair_of(frame: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray, pd.Series]:
    """Truth (labelled PNEUMONIA), pair score and path of the films labelled PNEUMONIA or NORMAL."""
    if not set(PAIR) <= set(frame["label"]):
        raise PipelineError(f"the focus films hold no {' or '.join(sorted(set(PAIR) - set(frame['label'])))} film")
    positive, score = pneumonia_vs_normal(frame, classes)
    return positive, score, frame.loc[frame["label"].isin(PAIR), "path"].reset_index(drop=True)


def needed(frame: pd.DataFrame, classes: list[str]) -> dict[str, float | int | None]:
    """One model's ranking (film counts, AUC, best sensitivity at the specificity, three counts) and its own rule."""
    positive, score, _ = pair_of(frame, classes)
    return {"pneumonia": int(positive.sum()), "normal": int((~positive).sum()), "auc": rank_auc(positive, score),
            "sensitivity": stats.sensitivity_at_specificity(positive, score, SPECIFICITY),
            "for_auc": fewest_relabelled(positive, score, auc_reached),
            "for_sensitivity": fewest_relabelled(positive, score, sensitivity_reached),
            "for_both": fewest_relabelled(positive, score, both_reached),
            "own_sensitivity": float((frame.loc[frame["label"] == PAIR[0], "predicted"] == PAIR[0]).mean()),
            "own_specificity": float((frame.loc[frame["label"] == PAIR[1], "predicted"] != PAIR[0]).mean()),
            "for_own_rule": fewest_for_own_rule(frame)}


def _count(k: int | None, films: int) -> str:
    return "none suffices" if k is None else f"{k} ({k / films:.0%})"


def markdown(rows: dict[tuple[str, str], dict]) -> str:
    lines = ["| model | split | PNEUMONIA films | NORMAL films | P-vs-N AUC | best PNEUMONIA sens at "
             f"{SPECIFICITY} spec | wrong labels for AUC >= {AUC_GOAL} | for sens >= {SENSITIVITY_GOAL} | for both | "
             "own rule: PNEUMONIA sens, NORMAL spec | wrong labels for the goal at its own rule |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for (model, split), row in rows.items():
        counts = " | ".join(_count(row[key], row["pneumonia"]) for key in ("for_auc", "for_sensitivity", "for_both"))
        lines.append(f"| {model} | {split} | {row['pneumonia']} | {row['normal']} | {row['auc']:.3f} | "
                     f"{row['sensitivity']:.3f} | {counts} | {row['own_sensitivity']:.3f}, {row['own_specificity']:.3f} | "
                     f"{_count(row['for_own_rule'], row['pneumonia'])} |")
    return "\n".join(lines)


def films_to_read(frame: pd.DataFrame, classes: list[str], k: int, source: pd.Series) -> str:
    """The ``k`` lowest-ranked PNEUMONIA films, lowest first, with their pair score and original file."""
    positive, score, paths = pair_of(frame, classes)
    lowest = positives_lowest_first(positive, score)[:k]
    lines = ["| film | P(PNEUMONIA) / (P(PNEUMONIA) + P(NORMAL)) | original file |", "|---|---:|---|"]
    lines += [f"| {paths[i]} | {score[i]:.3f} | {source.get(paths[i], '-')} |" for i in lowest]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[tuple[str, str], dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", type=Path, nargs="+", required=True, help="training_options.py scores.json files")
    parser.add_argument("--split", default="test", choices=SPLITS, help="the split whose films are listed")
    parser.add_argument("--manifest", type=Path, help="CSV with file and source_path columns (cxr3/manifest.csv)")
    args = parser.parse_args(argv)
    for path in args.scores:
        if not path.is_file():
            raise PipelineError(f"{path}: no such file")
    frames = {split: focus_frames(args.scores, split) for split in SPLITS}
    rows = {(model, split): needed(frame, classes_of(frames[split]))
            for split in SPLITS for model, frame in frames[split].items()}
    print(markdown(rows))
    model, frame = list(frames[args.split].items())[-1]
    k = rows[model, args.split]["for_both"]
    if k:
        source = (load_groups(GroupsParams(csv=str(args.manifest), group_column="source_path")) if args.manifest
                  else pd.Series(dtype=str))
        print(f"\nThe {k} {args.split} PNEUMONIA films {model} ranks lowest: if all are not pneumonia, it meets the goal.\n")
        print(films_to_read(frame, classes_of(frames[args.split]), k, source))
    return rows


if __name__ == "__main__":
    run(main)
