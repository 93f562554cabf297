"""External validation in numbers and words: scores on another data set, and their gap to the internal test score.

A model that scores well on its own test split may have learnt that data set's quirks (its
hospital, scanner or labelling) rather than the disease; a set collected elsewhere shows how
much of the score travels. Torch-free: everything works on predictions tables
(:mod:`cxr.evaluation.predictions`), so the numbers can be recomputed from the CSV files.

An external set may lack a class. Its macro-F1 is then averaged over the classes it has,
and so is the internal macro-F1 it is compared with, so the gap compares like with like
(a prediction of an absent class still counts as an error of the true class).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr import stats
from cxr.approaches import DISPLAY_NAMES
from cxr.errors import PipelineError
from cxr.reporting.comparison import interval
from cxr.stats import macro_f1_over

SCOPES = {"test": "the `test/` folder of a Kaggle-layout set", "all": "every image of the set"}


def gap_interval(
    external: tuple[np.ndarray, np.ndarray], internal: tuple[np.ndarray, np.ndarray], metric: stats.Metric,
    resamples: int, seed: int, alpha: float = 0.05,
) -> dict[str, float]:
    """External minus internal ``metric`` with a percentile bootstrap interval of the difference.

    ``external`` and ``internal`` are (true, predicted) class indices. The two test sets hold
    different images, so each is resampled on its own (independent streams from ``seed``), and
    the interval is that of the differences: it holds 0 when the model does as well outside.
    """
    external_rng, internal_rng = (np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(2))
    differences = (stats.bootstrap_replicates(*external, metric, resamples, external_rng)
                   - stats.bootstrap_replicates(*internal, metric, resamples, internal_rng))
    low, high = np.quantile(differences, [alpha / 2, 1 - alpha / 2])
    point = metric(*external) - metric(*internal)
    return {"value": round(float(point), 6), "ci_low": round(float(low), 6), "ci_high": round(float(high), 6)}


def _encoded(frame: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return stats.encode_labels(frame["label"], classes), stats.encode_labels(frame["predicted"], classes)


def model_gap(
    external: pd.DataFrame, internal: pd.DataFrame, classes: Sequence[str], present: Sequence[str],
    resamples: int, seed: int,
) -> dict[str, Any]:
    """One model on an external set: accuracy and macro-F1 with 95% intervals, its internal test
    scores, and the gap (external minus internal) with a 95% interval of the difference."""
    f1 = macro_f1_over([classes.index(name) for name in present], len(classes))
    outside, inside = _encoded(external, classes), _encoded(internal, classes)
    return {
        "accuracy": interval(*outside, stats.accuracy, resamples, seed),
        "f1_macro": interval(*outside, f1, resamples, seed),
        "internal": {"accuracy": round(stats.accuracy(*inside), 6), "f1_macro": round(f1(*inside), 6)},
        "gap": {
            "accuracy": gap_interval(outside, inside, stats.accuracy, resamples, seed),
            "f1_macro": gap_interval(outside, inside, f1, resamples, seed),
        },
    }


def set_report(
    external: Mapping[str, pd.DataFrame], internal: Mapping[str, pd.DataFrame], classes: Sequence[str],
    resamples: int, seed: int,
) -> dict[str, Any]:
    """Every model's :func:`model_gap` on one external set, with the classes it has and lacks."""
    labels = next(iter(external.values()))["label"]
    counts = {name: int((labels == name).sum()) for name in classes}
    present = [name for name in classes if counts[name] > 0]
    if not present:
        raise PipelineError("an external set has no readable image to score")
    for model in external:
        if model not in internal:
            raise PipelineError(f"no internal test predictions of {model} to compare the external scores with")
    return {
        "n_images": len(labels),
        "images_per_class": counts,
        "classes_present": present,
        "classes_missing": [name for name in classes if counts[name] == 0],
        "models": {model: model_gap(frame, internal[model], classes, present, resamples, seed)
                   for model, frame in external.items()},
    }


def _ci(entry: Mapping[str, float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{entry['value']:{sign}.4f} [{entry['ci_low']:{sign}.4f}, {entry['ci_high']:{sign}.4f}]"


def set_markdown(name: str, report: Mapping[str, Any]) -> str:
    """One external set as Markdown: what was scored, then a row per model with scores and gaps."""
    counts = ", ".join(f"{label} {report['images_per_class'][label]}" for label in report["classes_present"])
    missing = report["classes_missing"]
    lines = [
        f"### External set `{name}`",
        "",
        f"Source `{report['source']}`: {report['n_images']} images scored, {SCOPES[report['scope']]} ({counts}).",
        f"Unreadable files skipped: {report['skipped']}.",
    ]
    if missing:
        lines.append(f"Classes missing from this set: {', '.join(missing)}; macro-F1 (external and internal) is "
                     f"averaged over {', '.join(report['classes_present'])}.")
    lines += [
        "",
        "| Model | Accuracy [95% CI] | F1-Score (Macro) [95% CI] | Accuracy gap [95% CI] | Macro-F1 gap [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for model, scores in report["models"].items():
        lines.append(f"| {DISPLAY_NAMES.get(model, model)} | {_ci(scores['accuracy'])} | {_ci(scores['f1_macro'])} | "
                     f"{_ci(scores['gap']['accuracy'], signed=True)} | {_ci(scores['gap']['f1_macro'], signed=True)} |")
    return "\n".join(lines) + "\n"


def index_markdown(sections: Mapping[str, str], resamples: int) -> str:
    """The external-validation section of the summary: every set's table, or a line saying there is none."""
    lines = ["## External validation", ""]
    if not sections:
        return "\n".join([*lines, "No external test sets: `external` in params.yaml is empty.", ""])
    lines += [
        "Each model scored, never retrained, on data sets listed under `external` in params.yaml. Gap = external "
        "minus internal test score; its 95% interval comes from bootstrapping both test sets independently "
        f"({resamples} stratified resamples each), so an interval below 0 means the score drops outside.",
        "",
    ]
    return "\n".join(lines) + "\n" + "\n".join(sections.values())


def external_markdown(path: Path) -> str:
    """The external-validation section written by the external stage, for the summary and the report."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise PipelineError(f"{path} not found; run `dvc repro external` first") from None
