"""One decision rule for every collection: a weight on P(PNEUMONIA), chosen on validation.

At the most probable class the recipe calls most NIH pneumonia films NORMAL, although the best
threshold on the NIH films alone comes near issue 29's operating point (0.70 PNEUMONIA sensitivity
at 0.85 NORMAL specificity). The goal allows one model and one decision rule for every collection,
so a threshold for NIH alone is out; one weight w on P(PNEUMONIA) for every film is in: the film's
class is the most probable one after P(PNEUMONIA) is multiplied by w. A w above 1 calls films
PNEUMONIA sooner in every collection, and overall macro-F1 shows what that costs the others.

w is chosen on validation: the highest focus PNEUMONIA sensitivity at focus NORMAL specificity
(NORMAL films not called PNEUMONIA) of at least 0.85, the smallest w on ties. Test then reports
what that w scores, beside w = 1 (the pipeline's rule). With several score files the models'
equal-weight ensemble (mean probabilities) is tried too.

``python benchmarks/decision_rule.py --scores A/scores.json [B/scores.json ...] [--focus GROUP]`` reads
the ``films`` that ``benchmarks/training_options.py`` wrote and prints one row per model and weight.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr import stats
from cxr.console import run
from cxr.errors import PipelineError
from cxr.evaluation.ensemble import ensemble_frame
from cxr.evaluation.predictions import PROB_PREFIX, probabilities_of
from cxr.files import read_json

NIH = "muhammedtalo/COVID-19"
SPECIFICITY = 0.85  # issue 29's goal: NIH PNEUMONIA sensitivity >= 0.70 at NIH NORMAL specificity >= 0.85
WEIGHTS = np.geomspace(1, 100, 49)  # w = 1 first: the most probable class
SPLITS = ("val", "test")
ENSEMBLE = "ensemble (mean probabilities)"


def scored_films(score_files: list[Path]) -> dict[str, dict[str, pd.DataFrame]]:
    """Per model (``<folder>/<option>``, and their ensemble when several), each split's films, sorted by path."""
    models: dict[str, dict[str, pd.DataFrame]] = {}
    for path in score_files:
        for option, splits in read_json(path).items():
            if any("films" not in splits.get(split, {}) for split in SPLITS):
                raise PipelineError(f"{path}: option {option} has no scored films for every split; "
                                    "rescore it with benchmarks/training_options.py")
            models[f"{path.parent.name}/{option}"] = {
                split: pd.DataFrame(splits[split]["films"]).sort_values("path", ignore_index=True) for split in SPLITS}
    if len(models) > 1:
        models[ENSEMBLE] = {split: _ensemble([films[split] for films in models.values()]) for split in SPLITS}
    return models


def _ensemble(frames: list[pd.DataFrame]) -> pd.DataFrame:
    named = dict(enumerate(frames))
    mean = ensemble_frame(named, classes_of(frames[0]), {name: 1 / len(frames) for name in named})
    return mean.assign(group=frames[0]["group"])


def classes_of(frame: pd.DataFrame) -> list[str]:
    """The class names, from the probability columns in their order."""
    return [column.removeprefix(PROB_PREFIX) for column in frame.columns if column.startswith(PROB_PREFIX)]


def weighted_predictions(frame: pd.DataFrame, classes: list[str], weight: float) -> np.ndarray:
    """Class indices after P(PNEUMONIA) is multiplied by ``weight`` (ties to the lower index, as argmax)."""
    probabilities = probabilities_of(frame, classes).copy()
    probabilities[:, classes.index("PNEUMONIA")] *= weight
    return probabilities.argmax(axis=1)


def rule_scores(frame: pd.DataFrame, classes: list[str], weight: float, focus: str) -> dict[str, float]:
    """Overall macro-F1, and the focus collection's PNEUMONIA sensitivity and NORMAL specificity, at ``weight``."""
    truth, predicted = stats.encode_labels(frame["label"], classes), weighted_predictions(frame, classes, weight)
    pneumonia, normal = classes.index("PNEUMONIA"), classes.index("NORMAL")
    in_focus = (frame["group"] == focus).to_numpy()
    positives, negatives = in_focus & (truth == pneumonia), in_focus & (truth == normal)
    if not positives.any() or not negatives.any():
        raise PipelineError(f"the {focus} films hold no PNEUMONIA or no NORMAL film")
    return {"macro_f1": stats.macro_f1(len(classes))(truth, predicted),
            "sensitivity": float(np.mean(predicted[positives] == pneumonia)),
            "specificity": float(np.mean(predicted[negatives] != pneumonia))}


def chosen_weight(frame: pd.DataFrame, classes: list[str], focus: str) -> float | None:
    """The weight with the highest focus sensitivity at specificity >= ``SPECIFICITY`` (None if no weight keeps it)."""
    best, best_sensitivity = None, -1.0
    for weight in WEIGHTS:
        scores = rule_scores(frame, classes, weight, focus)
        if scores["specificity"] >= SPECIFICITY and scores["sensitivity"] > best_sensitivity:
            best, best_sensitivity = float(weight), scores["sensitivity"]
    return best


def model_rows(films: dict[str, pd.DataFrame], focus: str) -> list[dict[str, Any]]:
    """The pipeline's rule (w = 1) and the weight chosen on validation, each scored on both splits."""
    classes = classes_of(films["val"])
    weights = [1.0]
    chosen = chosen_weight(films["val"], classes, focus)
    if chosen is not None and chosen != 1.0:
        weights.append(chosen)
    return [{"weight": weight, **{split: rule_scores(films[split], classes, weight, focus) for split in SPLITS}}
            for weight in weights]


def markdown(rows: dict[str, list[dict[str, Any]]], focus: str) -> str:
    lines = [f"Focus collection: {focus}. Specificity = share of its NORMAL films not called PNEUMONIA.", "",
             "| model | weight on P(PNEUMONIA) | val macro-F1 | val focus PNEUMONIA sens | val focus NORMAL spec | "
             "test macro-F1 | test focus PNEUMONIA sens | test focus NORMAL spec |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, entries in rows.items():
        for entry in entries:
            cells = " | ".join(f"{entry[split][key]:.4f}" for split in SPLITS
                               for key in ("macro_f1", "sensitivity", "specificity"))
            lines.append(f"| {model} | {entry['weight']:.2f} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", type=Path, nargs="+", required=True, help="training_options.py scores.json files")
    parser.add_argument("--focus", default=NIH, help="the collection the weight is chosen for")
    args = parser.parse_args(argv)
    for path in args.scores:
        if not path.is_file():
            raise PipelineError(f"{path}: no such file")
    rows = {model: model_rows(films, args.focus) for model, films in scored_films(args.scores).items()}
    print(markdown(rows, args.focus))
    return rows


if __name__ == "__main__":
    run(main)
