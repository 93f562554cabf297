"""Ensemble, intervals, paired tests and calibration of the compare stage."""

import numpy as np
import pytest

from cxr.errors import PipelineError
from cxr.evaluation.ensemble import ensemble_frame, ensemble_weights
from cxr.evaluation.predictions import predictions_frame, probabilities_of
from cxr.params import CLASSES
from cxr.reporting.comparison import model_report, paired_tests, temperature_calibration


def frame(probabilities, labels=(0, 1, 2), paths=("a", "b", "c")):
    return predictions_frame(list(paths), np.array(labels), np.array(probabilities, dtype=float), CLASSES)


A = frame([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
B = frame([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])


@pytest.mark.parametrize(("weights", "expected", "predicted"), [
    ({"a": 0.5, "b": 0.5}, [[0.4, 0.5, 0.1], [0.15, 0.65, 0.2], [0.2, 0.2, 0.6]], ["NORMAL", "NORMAL", "PNEUMONIA"]),
    ({"a": 0.8, "b": 0.2}, [[0.52, 0.38, 0.1], [0.18, 0.56, 0.26], [0.14, 0.14, 0.72]], ["COVID19", "NORMAL", "PNEUMONIA"]),
    ({"a": 0.1, "b": 0.9}, [[0.24, 0.66, 0.1], [0.11, 0.77, 0.12], [0.28, 0.28, 0.44]], ["NORMAL", "NORMAL", "PNEUMONIA"]),
])
def test_ensemble_row_is_the_hand_computed_weighted_average(weights, expected, predicted):
    ensemble = ensemble_frame({"a": A, "b": B}, CLASSES, weights)
    assert np.allclose(probabilities_of(ensemble, CLASSES), expected)
    assert list(ensemble["predicted"]) == predicted
    assert list(ensemble["label"]) == ["COVID19", "NORMAL", "PNEUMONIA"]


def test_weighted_ensemble_uses_validation_macro_f1_weights():
    # A is right on all three images (macro-F1 1); B calls COVID19 NORMAL: F1 0, 2/3 and 1, mean 5/9.
    weights = ensemble_weights({"a": A, "b": B}, CLASSES, "val_f1")
    assert weights == pytest.approx({"a": 9 / 14, "b": 5 / 14})
    assert ensemble_weights({"a": A, "b": B}, CLASSES, "equal") == {"a": 0.5, "b": 0.5}


def test_models_on_different_images_cannot_be_ensembled():
    other = frame([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]], paths=("a", "b", "z"))
    with pytest.raises(PipelineError, match="other images"):
        ensemble_frame({"a": A, "b": other}, CLASSES, {"a": 0.5, "b": 0.5})


def test_model_report_intervals_bracket_the_point_estimates():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 50)
    probabilities = rng.dirichlet([1, 1, 1], size=150)
    probabilities[np.arange(150)[:120], labels[:120]] += 2
    probabilities /= probabilities.sum(1, keepdims=True)
    report = model_report(predictions_frame([str(i) for i in range(150)], labels, probabilities, CLASSES),
                          CLASSES, resamples=200, seed=0, ece_bins=15)
    for entry in (report["accuracy"], report["f1_macro"], report["per_class"]["NORMAL"]["sensitivity"]):
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    assert 0.5 < report["roc_auc"]["macro"] <= 1 and 0 <= report["ece"] <= 1


def test_paired_tests_name_every_pair_in_words():
    table, sentences = paired_tests({"a": A, "b": B, "c": A}, {"a": "A", "b": "B", "c": "C"}, 0.05)
    assert set(table) == {"A vs B", "A vs C", "B vs C"}
    assert table["A vs C"]["p_value"] == 1.0 and not table["A vs C"]["significant"]
    assert len(sentences) == 3 and all("not significant at 0.05" in s for s in sentences)


def test_temperature_scaling_is_fitted_on_validation_only():
    val = frame([[0.98, 0.01, 0.01], [0.98, 0.01, 0.01], [0.01, 0.01, 0.98]])
    calibration, calibrated = temperature_calibration(val, A, CLASSES, ece_bins=15)
    assert calibration["temperature"] > 1
    assert calibrated.shape == (3, 3) and np.allclose(calibrated.sum(1), 1)
