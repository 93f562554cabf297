"""The honest comparison: confidence intervals, paired tests, AUC and calibration.

Everything here works on predictions tables (:mod:`cxr.evaluation.predictions`), so the numbers can
be recomputed from the CSV files alone, without a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cxr import stats
from cxr.evaluation.predictions import probabilities_of


def interval(y_true: np.ndarray, y_pred: np.ndarray, metric: stats.Metric, resamples: int, seed: int) -> dict[str, float]:
    """A score with its 95% stratified-bootstrap interval, rounded for the metrics files."""
    point, low, high = stats.bootstrap_ci(y_true, y_pred, metric, n_resamples=resamples, seed=seed)
    return {"value": round(point, 6), "ci_low": round(low, 6), "ci_high": round(high, 6)}


def model_report(
    frame: pd.DataFrame, classes: Sequence[str], resamples: int, seed: int, ece_bins: int
) -> dict[str, Any]:
    """Accuracy and macro-F1 with 95% stratified-bootstrap intervals, per-class sensitivity and
    PPV with intervals, one-vs-rest ROC AUC per class and macro, and expected calibration error."""
    y_true = stats.encode_labels(frame["label"], classes)
    y_pred = stats.encode_labels(frame["predicted"], classes)
    probabilities = probabilities_of(frame, classes)
    return {
        "accuracy": interval(y_true, y_pred, stats.accuracy, resamples, seed),
        "f1_macro": interval(y_true, y_pred, stats.macro_f1(len(classes)), resamples, seed),
        "per_class": {
            name: {
                "sensitivity": interval(y_true, y_pred, stats.class_recall(i), resamples, seed),
                "ppv": interval(y_true, y_pred, stats.class_precision(i), resamples, seed),
            }
            for i, name in enumerate(classes)
        },
        "roc_auc": {k: round(v, 6) for k, v in stats.roc_auc_per_class(y_true, probabilities, classes).items()},
        "ece": round(stats.expected_calibration_error(probabilities, y_true, ece_bins), 6),
    }


def temperature_calibration(
    val_frame: pd.DataFrame, test_frame: pd.DataFrame, classes: Sequence[str], ece_bins: int
) -> tuple[dict[str, float], np.ndarray]:
    """Fit one temperature on validation predictions; return test ECE before/after and calibrated test probabilities."""
    val_logits = stats.logits_from_probabilities(probabilities_of(val_frame, classes))
    temperature = stats.fit_temperature(val_logits, stats.encode_labels(val_frame["label"], classes))
    test_probabilities = probabilities_of(test_frame, classes)
    calibrated = stats.apply_temperature(stats.logits_from_probabilities(test_probabilities), temperature)
    y_true = stats.encode_labels(test_frame["label"], classes)
    return {
        "temperature": round(temperature, 6),
        "ece_before": round(stats.expected_calibration_error(test_probabilities, y_true, ece_bins), 6),
        "ece_after": round(stats.expected_calibration_error(calibrated, y_true, ece_bins), 6),
    }, calibrated


def paired_tests(frames: Mapping[str, pd.DataFrame], names: Mapping[str, str], alpha: float) -> tuple[dict[str, Any], list[str]]:
    """Exact McNemar test for every pair of models on the same images, Holm-corrected, in numbers and words."""
    correct = {names[key]: (frame["label"] == frame["predicted"]).to_numpy() for key, frame in frames.items()}
    results = stats.pairwise_mcnemar(correct)
    adjusted = stats.holm({f"{a} vs {b}": r["p_value"] for (a, b), r in results.items()})
    table = {
        f"{a} vs {b}": {
            "right_only_first": int(r["b"]),
            "right_only_second": int(r["c"]),
            "p_value": round(float(r["p_value"]), 6),
            "p_holm": round(adjusted[f"{a} vs {b}"], 6),
            "significant": bool(adjusted[f"{a} vs {b}"] < alpha),
        }
        for (a, b), r in results.items()
    }
    return table, stats.significance_sentences(results, alpha)
