"""Every statistic the report prints, checked by value against an independent reference at several inputs.

References: the analytic binomial standard error for bootstrap intervals, ``scipy.stats.binomtest`` for
McNemar, the step-down definition for Holm, ``sklearn.calibration.calibration_curve`` and hand counts
for calibration, a grid search of the NLL for temperature scaling, ``sklearn.metrics`` for per-class
and macro scores, and hand-computed tables for the ensemble and the subgroups; ``sklearn.metrics.roc_curve`` for the
sensitivity at a specificity.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import log_softmax, softmax
from scipy.stats import binom, binomtest
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, recall_score, roc_curve

from cxr import stats
from cxr.evaluation.ensemble import ensemble_frame, ensemble_weights
from cxr.evaluation.predictions import predictions_frame, probabilities_of
from cxr.params import CLASSES
from cxr.reporting.comparison import model_report, paired_tests, temperature_calibration
from cxr.reporting.external_report import gap_interval
from cxr.reporting.scores import classification_metrics
from cxr.reporting.subgroups import subgroup_report
from cxr.reporting.tables import summary_table

Z95 = 1.959964
WIDTH_TOLERANCE = 0.08  # 2,000 resamples estimate a 95% percentile interval's width to about 3% (one SD)
HALF_TOLERANCE = 0.15  # each half (point to one end) to about 5%


def right_per_class(per_class: tuple[int, ...], accuracy: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predictions that are right for exactly round(accuracy * n_k) images of every class k."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(per_class)), per_class)
    predicted = labels.copy()
    for k in range(len(per_class)):
        members = np.flatnonzero(labels == k)
        wrong = rng.permutation(members)[: len(members) - round(accuracy * len(members))]
        predicted[wrong] = (k + rng.integers(1, len(per_class), size=len(wrong))) % len(per_class)
    return labels, predicted


def binomial_se(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    accuracy = float(np.mean(y_true == y_pred))
    return float(np.sqrt(accuracy * (1 - accuracy) / len(y_true)))


def assert_normal_interval(point: float, low: float, high: float, se: float) -> None:
    """A 95% interval: width 2 * 1.96 * SE within WIDTH_TOLERANCE, each half 1.96 * SE within HALF_TOLERANCE."""
    assert (high - low) / (2 * Z95 * se) == pytest.approx(1, abs=WIDTH_TOLERANCE)
    assert (point - low) / (Z95 * se) == pytest.approx(1, abs=HALF_TOLERANCE)
    assert (high - point) / (Z95 * se) == pytest.approx(1, abs=HALF_TOLERANCE)


# --- bootstrap intervals -----------------------------------------------------------------------------


@pytest.mark.parametrize(("per_class", "accuracy"), [((1000, 1500, 1500), 0.9), ((1500, 1500, 1500), 0.7),
                                                     ((800, 1200, 2000), 0.95)])
def test_accuracy_interval_has_the_width_of_the_binomial_95_percent_interval(per_class, accuracy):
    y_true, y_pred = right_per_class(per_class, accuracy, seed=sum(per_class))
    point, low, high = stats.bootstrap_ci(y_true, y_pred, stats.accuracy, n_resamples=2000, seed=1)
    assert point == pytest.approx(accuracy_score(y_true, y_pred))
    assert_normal_interval(point, low, high, binomial_se(y_true, y_pred))


@pytest.mark.parametrize(("outside", "inside"), [(((500, 500, 500), 0.75), ((700, 900, 400), 0.9)),
                                                 (((1000, 600, 400), 0.6), ((800, 800, 800), 0.85))])
def test_gap_interval_has_the_width_of_two_independent_binomials(outside, inside):
    external, internal = right_per_class(*outside, seed=1), right_per_class(*inside, seed=2)
    gap = gap_interval(external, internal, stats.accuracy, resamples=2000, seed=0)
    assert gap["value"] == pytest.approx(accuracy_score(*external) - accuracy_score(*internal), abs=1e-6)
    se = np.hypot(binomial_se(*external), binomial_se(*internal))
    assert_normal_interval(gap["value"], gap["ci_low"], gap["ci_high"], se)


def test_sensitivity_interval_has_the_width_of_the_binomial_within_its_class():
    labels, predicted = right_per_class((800, 1000, 1200), 0.8, seed=3)
    probabilities = np.eye(3)[predicted] * 0.6 + 0.2 / 1.5
    report = model_report(predictions_frame([str(i) for i in range(len(labels))], labels, probabilities, CLASSES),
                          CLASSES, resamples=1000, seed=0, ece_bins=10)
    for k, name in enumerate(CLASSES):
        members = labels == k
        entry = report["per_class"][name]["sensitivity"]
        assert entry["value"] == pytest.approx(0.8)
        assert_normal_interval(entry["value"], entry["ci_low"], entry["ci_high"],
                               binomial_se(labels[members], predicted[members]))


# --- McNemar and Holm --------------------------------------------------------------------------------


def discordant(b: int, c: int, concordant: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of two models: b images right only by A, c right only by B, plus both-right and both-wrong ones."""
    a_right = [True] * b + [False] * c + [True] * concordant + [False] * concordant
    b_right = [False] * b + [True] * c + [True] * concordant + [False] * concordant
    return np.array(a_right), np.array(b_right)


@pytest.mark.parametrize(("b", "c"), [(0, 1), (1, 0), (1, 9), (9, 1), (5, 5), (3, 12), (20, 35), (50, 30),
                                      (0, 6), (100, 140), (7, 8)])
def test_mcnemar_p_value_is_the_exact_two_sided_binomial_test(b, c):
    result = stats.mcnemar_exact(*discordant(b, c))
    assert (result["b"], result["c"], result["n_discordant"]) == (b, c, b + c)
    assert result["p_value"] == pytest.approx(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue, rel=1e-12)
    assert result["p_value"] == pytest.approx(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)), rel=1e-9)


def test_mcnemar_without_discordant_images_is_p_1():
    assert stats.mcnemar_exact(*discordant(0, 0))["p_value"] == 1.0


def test_paired_tests_report_the_reference_p_values_holm_adjusted():
    labels = np.zeros(60, dtype=np.int64)
    hit, miss = [0.8, 0.1, 0.1], [0.1, 0.8, 0.1]
    right = {"a": np.arange(60) < 50, "b": np.arange(60) < 30, "c": (np.arange(60) < 20) | (np.arange(60) >= 48)}
    frames = {name: predictions_frame([str(i) for i in range(60)], labels, np.array([hit if r else miss for r in ok]),
                                      CLASSES) for name, ok in right.items()}
    table, _ = paired_tests(frames, {"a": "A", "b": "B", "c": "C"}, alpha=0.05)
    # Images right only by the first / only by the second model of each pair, counted by hand.
    expected = {"A vs B": (20, 0), "A vs C": (28, 10), "B vs C": (10, 12)}
    raw = {}
    for pair, (b, c) in expected.items():
        assert (table[pair]["right_only_first"], table[pair]["right_only_second"]) == (b, c)
        raw[pair] = binomtest(b, b + c, 0.5).pvalue
        assert table[pair]["p_value"] == pytest.approx(raw[pair], abs=1e-6)
    order = sorted(raw, key=raw.get)
    holm_by_hand = {order[0]: 3 * raw[order[0]]}
    holm_by_hand[order[1]] = max(holm_by_hand[order[0]], 2 * raw[order[1]])
    holm_by_hand[order[2]] = min(1.0, max(holm_by_hand[order[1]], raw[order[2]]))
    for pair in expected:
        assert table[pair]["p_holm"] == pytest.approx(holm_by_hand[pair], abs=1e-6)
        assert table[pair]["significant"] == (holm_by_hand[pair] < 0.05)


@pytest.mark.parametrize(("raw", "adjusted"), [
    ({"x": 0.03}, {"x": 0.03}),
    ({"a": 0.01, "b": 0.01, "c": 0.04}, {"a": 0.03, "b": 0.03, "c": 0.04}),  # tie: both get 3 * 0.01
    ({"a": 0.02, "b": 0.02, "c": 0.02}, {"a": 0.06, "b": 0.06, "c": 0.06}),
    ({"a": 0.4, "b": 0.5}, {"a": 0.8, "b": 0.8}),  # b * 1 = 0.5 raised to keep the order
    ({"a": 0.6, "b": 0.01}, {"a": 0.6, "b": 0.02}),
    ({"a": 0.5, "b": 0.6, "c": 0.7}, {"a": 1.0, "b": 1.0, "c": 1.0}),  # capped at 1
    ({"a": 0.001, "b": 0.2, "c": 0.012, "d": 0.04}, {"a": 0.004, "b": 0.2, "c": 0.036, "d": 0.08}),
])
def test_holm_on_hand_computed_cases(raw, adjusted):
    assert stats.holm(raw) == pytest.approx(adjusted, abs=1e-12)


def holm_rejects(p_values: dict[str, float], alpha: float) -> set[str]:
    """Holm's step-down rule itself: reject in increasing order while p_(k) <= alpha / (m - k + 1)."""
    rejected: set[str] = set()
    for rank, name in enumerate(sorted(p_values, key=p_values.get)):
        if p_values[name] > alpha / (len(p_values) - rank):
            break
        rejected.add(name)
    return rejected


@pytest.mark.parametrize("seed", range(6))
def test_holm_adjusted_p_values_reject_what_the_step_down_rule_rejects(seed):
    rng = np.random.default_rng(seed)
    raw = {f"h{i}": float(p) for i, p in enumerate(rng.choice([0.001, 0.004, 0.01, 0.02, 0.03, 0.2, 0.6],
                                                              size=2 + seed))}
    adjusted = stats.holm(raw)
    in_raw_order = [adjusted[name] for name in sorted(raw, key=raw.get)]
    assert in_raw_order == sorted(in_raw_order) and max(in_raw_order) <= 1.0  # monotone, capped
    assert all(adjusted[name] >= raw[name] for name in raw)
    for alpha in (0.0065, 0.013, 0.027, 0.047, 0.11, 0.55):  # never a multiple of a p
        assert {name for name in raw if adjusted[name] <= alpha} == holm_rejects(raw, alpha)


# --- calibration -------------------------------------------------------------------------------------


def rows_with_confidence(confidences: list[float]) -> np.ndarray:
    """Three-class probability rows whose top class is 0 with the given confidence."""
    return np.array([[c, (1 - c) / 2, (1 - c) / 2] for c in confidences])


def test_reliability_bins_and_ece_on_hand_counted_unequal_bins():
    # Four bins (0, .25], (.25, .5], (.5, .75], (.75, 1]: confidences on the edges 0.5 and 0.75 belong below.
    confidences = [0.4, 0.5, 0.6, 0.6, 0.6, 0.6, 0.75, 0.9, 0.9, 1.0]
    right = [True, False, True, True, True, False, True, True, True, True]
    labels = np.where(right, 0, 1)
    bins = stats.reliability_bins(rows_with_confidence(confidences), labels, n_bins=4)
    assert bins["count"].tolist() == [0, 2, 5, 3]
    assert bins["confidence"][1:] == pytest.approx([0.45, 0.63, 2.8 / 3])
    assert bins["accuracy"][1:] == pytest.approx([0.5, 0.8, 1.0])
    assert np.isnan(bins["confidence"][0]) and np.isnan(bins["accuracy"][0])
    assert bins["bin_lower"].tolist() == [0, 0.25, 0.5, 0.75] and bins["bin_upper"].tolist() == [0.25, 0.5, 0.75, 1]
    ece = 0.2 * 0.05 + 0.5 * 0.17 + 0.3 * (1 - 2.8 / 3)
    assert stats.expected_calibration_error(rows_with_confidence(confidences), labels, n_bins=4) == pytest.approx(ece)


def reference_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Top-label ECE from scikit-learn's calibration curve, weighted by numpy's per-bin counts."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
    counts = np.histogram(confidence, bins=np.linspace(0, 1, n_bins + 1))[0]
    return float(np.sum(counts[counts > 0] / len(labels) * np.abs(accuracy - mean_confidence)))


@pytest.mark.parametrize(("n_bins", "sharpness", "seed"), [(5, 1.0, 0), (10, 3.0, 1), (15, 0.5, 2), (7, 2.0, 3)])
def test_reliability_bins_and_ece_match_sklearn_calibration_curve(n_bins, sharpness, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(800, 3))
    labels = (rng.random((800, 1)) > softmax(logits, axis=1).cumsum(axis=1)).sum(axis=1)
    probs = softmax(sharpness * logits, axis=1)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    bins = stats.reliability_bins(probs, labels, n_bins=n_bins)
    filled = bins["count"] > 0
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
    assert bins["accuracy"][filled] == pytest.approx(accuracy)
    assert bins["confidence"][filled] == pytest.approx(mean_confidence)
    assert bins["count"].tolist() == np.histogram(confidence, bins=np.linspace(0, 1, n_bins + 1))[0].tolist()
    assert stats.expected_calibration_error(probs, labels, n_bins) == pytest.approx(reference_ece(probs, labels, n_bins))


def grid_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The NLL-minimising temperature by brute force: a log grid over [0.05, 20], then a fine grid around its best."""
    def nll(temperatures: np.ndarray) -> np.ndarray:
        scaled = log_softmax(logits[None] / temperatures[:, None, None], axis=2)
        return -scaled[:, np.arange(len(labels)), labels].mean(axis=1)

    coarse = np.geomspace(0.05, 20, 401)
    best = int(np.argmin(nll(coarse)))
    fine = np.linspace(coarse[max(best - 1, 0)], coarse[min(best + 1, 400)], 401)
    return float(fine[np.argmin(nll(fine))])


def drawn_logits(scale: float, seed: int, n: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) and logits scale * z: over-confident for scale > 1, under- for scale < 1."""
    rng = np.random.default_rng(seed)
    calibrated = rng.normal(0, 1.5, size=(n, 3))
    labels = (rng.random((n, 1)) > softmax(calibrated, axis=1).cumsum(axis=1)).sum(axis=1)
    return scale * calibrated, labels


@pytest.mark.parametrize(("scale", "seed"), [(3.0, 0), (0.5, 1), (1.0, 2), (1.7, 3)])
def test_fitted_temperature_is_the_nll_minimum_of_a_grid_search(scale, seed):
    logits, labels = drawn_logits(scale, seed)
    assert stats.fit_temperature(logits, labels) == pytest.approx(grid_temperature(logits, labels), abs=1e-3)


def test_temperature_calibration_fits_on_validation_and_reports_the_reference_ece():
    val_logits, val_labels = drawn_logits(2.5, seed=4, n=600)
    test_logits, test_labels = drawn_logits(2.5, seed=5, n=400)
    val = predictions_frame([str(i) for i in range(600)], val_labels, softmax(val_logits, axis=1), CLASSES)
    test = predictions_frame([str(i) for i in range(400)], test_labels, softmax(test_logits, axis=1), CLASSES)
    result, calibrated = temperature_calibration(val, test, CLASSES, ece_bins=10)
    temperature = grid_temperature(np.log(np.clip(probabilities_of(val, CLASSES), 1e-12, None)), val_labels)
    assert result["temperature"] == pytest.approx(temperature, abs=1e-3)
    expected = softmax(np.log(np.clip(probabilities_of(test, CLASSES), 1e-12, None)) / temperature, axis=1)
    assert calibrated == pytest.approx(expected, abs=1e-4)
    assert result["ece_before"] == pytest.approx(reference_ece(probabilities_of(test, CLASSES), test_labels, 10), abs=1e-6)
    assert result["ece_after"] == pytest.approx(reference_ece(expected, test_labels, 10), abs=1e-3)


# --- ensemble ----------------------------------------------------------------------------------------

THREE = {
    "a": [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]],
    "b": [[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7]],
    "c": [[0.3, 0.3, 0.4], [0.5, 0.2, 0.3], [0.6, 0.2, 0.2], [0.2, 0.2, 0.6]],
}


def frames_of(probabilities: dict[str, list[list[float]]], labels: tuple[int, ...] = (0, 1, 2, 2)) -> dict:
    return {name: predictions_frame(["w", "x", "y", "z"], np.array(labels), np.array(rows), CLASSES)
            for name, rows in probabilities.items()}


@pytest.mark.parametrize(("weights", "expected", "predicted"), [
    ({"a": 0.8, "b": 0.2, "c": 0.0},
     [[0.52, 0.38, 0.10], [0.18, 0.56, 0.26], [0.14, 0.14, 0.72], [0.42, 0.36, 0.22]],
     ["COVID19", "NORMAL", "PNEUMONIA", "COVID19"]),
    ({"a": 0.5, "b": 0.2, "c": 0.3},
     [[0.43, 0.38, 0.19], [0.27, 0.47, 0.26], [0.29, 0.17, 0.54], [0.33, 0.30, 0.37]],
     ["COVID19", "NORMAL", "PNEUMONIA", "PNEUMONIA"]),
    ({"a": 0.2, "b": 0.1, "c": 0.7},
     [[0.35, 0.34, 0.31], [0.40, 0.32, 0.28], [0.47, 0.19, 0.34], [0.25, 0.24, 0.51]],
     ["COVID19", "COVID19", "COVID19", "PNEUMONIA"]),
])
def test_ensemble_probabilities_are_the_hand_computed_weighted_average(weights, expected, predicted):
    ensemble = ensemble_frame(frames_of(THREE), CLASSES, weights)
    assert probabilities_of(ensemble, CLASSES) == pytest.approx(np.array(expected), abs=1e-9)
    assert list(ensemble["predicted"]) == predicted  # equal weights would call the last image PNEUMONIA every time
    assert list(ensemble["label"]) == ["COVID19", "NORMAL", "PNEUMONIA", "PNEUMONIA"]


def test_validation_weights_are_proportional_to_sklearn_macro_f1():
    frames = frames_of(THREE)
    # Predictions a: 0 1 2 0, b: 1 1 2 2, c: 2 0 0 2 against labels 0 1 2 2.
    f1 = {name: f1_score([0, 1, 2, 2], stats.encode_labels(frame["predicted"], CLASSES), labels=[0, 1, 2],
                         average="macro", zero_division=0) for name, frame in frames.items()}
    assert f1 == pytest.approx({"a": (2 / 3 + 1 + 2 / 3) / 3, "b": (0 + 2 / 3 + 1) / 3, "c": (0 + 0 + 0.5) / 3})
    weights = ensemble_weights(frames, CLASSES, "val_f1")
    assert weights == pytest.approx({name: score / sum(f1.values()) for name, score in f1.items()})


# --- per-class scores, macro-F1 and the summary table ------------------------------------------------


def confusion_case(seed: int, drop_prediction: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=240)
    predicted = np.where(rng.random(240) < 0.65, labels, rng.integers(0, 3, size=240))
    if drop_prediction is not None:
        predicted[predicted == drop_prediction] = (drop_prediction + 1) % 3
    return labels, predicted


def report_of(labels: np.ndarray, predicted: np.ndarray, resamples: int = 50) -> tuple[dict, pd.DataFrame]:
    probabilities = np.eye(3)[predicted] * 0.5 + 0.5 / 3
    frame = predictions_frame([str(i) for i in range(len(labels))], labels, probabilities, CLASSES)
    return model_report(frame, CLASSES, resamples=resamples, seed=0, ece_bins=10), frame


@pytest.mark.parametrize(("seed", "drop"), [(0, None), (1, 2), (2, 0)])
def test_per_class_sensitivity_and_ppv_match_sklearn(seed, drop):
    labels, predicted = confusion_case(seed, drop)
    report, _ = report_of(labels, predicted)
    precision, recall, _, _ = precision_recall_fscore_support(labels, predicted, labels=[0, 1, 2], zero_division=0)
    for k, name in enumerate(CLASSES):
        assert report["per_class"][name]["sensitivity"]["value"] == pytest.approx(recall[k], abs=1e-6)
        assert report["per_class"][name]["ppv"]["value"] == pytest.approx(precision[k], abs=1e-6)
    assert report["accuracy"]["value"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)


@pytest.mark.parametrize(("labels", "predicted"), [
    ([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]),
    ([0, 0, 2, 2, 0, 2], [0, 2, 2, 2, 0, 0]),  # class 1 neither true nor predicted: counts as F1 0
    ([0, 0, 0, 2, 2, 2], [0, 1, 0, 2, 1, 2]),  # class 1 predicted, never true
    ([1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1]),
])
def test_macro_f1_is_sklearn_over_every_class(labels, predicted):
    expected = f1_score(labels, predicted, labels=[0, 1, 2], average="macro", zero_division=0)
    assert stats.macro_f1(3)(np.array(labels), np.array(predicted)) == pytest.approx(expected)


@pytest.mark.parametrize(("seed", "absent"), [(3, None), (4, 1), (5, 2)])
def test_summary_table_macro_f1_equals_the_interval_point_value(seed, absent):
    labels, predicted = confusion_case(seed)
    if absent is not None:  # a class neither true nor predicted: both numbers must follow the same rule
        keep = (labels != absent) & (predicted != absent)
        labels, predicted = labels[keep], predicted[keep]
    report, frame = report_of(labels, predicted, resamples=20)
    table = summary_table({"custom": classification_metrics(frame["label"], frame["predicted"], CLASSES)})
    assert table["F1-Score (Macro)"].iloc[0] == pytest.approx(report["f1_macro"]["value"], abs=1e-6)
    assert table["Accuracy"].iloc[0] == pytest.approx(report["accuracy"]["value"], abs=1e-6)


# --- subgroups ---------------------------------------------------------------------------------------


def grouped_frame() -> tuple[pd.DataFrame, pd.Series, dict[str, tuple[int, int]]]:
    """Four groups with hand-set (images, right) counts; 'tiny' is the least accurate but too small to rank."""
    plan = {"north": (40, 36), "south": (30, 21), "east": (20, 16), "tiny": (6, 1)}
    paths, labels, predicted, group = [], [], [], []
    for name, (images, right) in plan.items():
        for i in range(images):
            label = i % 3
            paths.append(f"Data/test/{name}{i}.png")
            labels.append(label)
            predicted.append(label if i < right else (label + 1) % 3)
            group.append(name)
    probabilities = np.eye(3)[predicted] * 0.7 + 0.1
    frame = predictions_frame(paths, np.array(labels), probabilities, CLASSES)
    groups = pd.Series(group, index=[path.removeprefix("Data/") for path in paths])
    return frame, groups, plan


def test_subgroup_accuracy_sensitivity_and_worst_group_match_hand_counts():
    frame, groups, plan = grouped_frame()
    report = subgroup_report({"custom": frame}, groups, list(CLASSES), resamples=50, seed=0)["custom"]
    assert report["worst_group"] == "south"  # 0.70; tiny (1/6) has under 10 images
    for name, (images, right) in plan.items():
        scores = report["groups"][name]
        assert scores["images"] == images
        assert scores["accuracy"]["value"] == pytest.approx(right / images, abs=1e-6)
        part = frame[frame["path"].str.startswith(f"Data/test/{name}")]
        truth, guess = stats.encode_labels(part["label"], CLASSES), stats.encode_labels(part["predicted"], CLASSES)
        for k, label in enumerate(CLASSES):
            expected = recall_score(truth, guess, labels=[k], average="macro", zero_division=0)
            assert scores["sensitivity"][label]["value"] == pytest.approx(expected, abs=1e-6)


def test_subgroup_accuracy_interval_has_the_binomial_width_of_its_group():
    labels, predicted = right_per_class((900, 900, 900), 0.85, seed=6)
    paths = [f"test/{i}.png" for i in range(len(labels))]
    frame = predictions_frame(paths, labels, np.eye(3)[predicted] * 0.7 + 0.1, CLASSES)
    groups = pd.Series(np.where(np.arange(len(labels)) % 3 == 0, "small", "large"), index=paths)
    report = subgroup_report({"custom": frame}, groups, list(CLASSES), resamples=1000, seed=0)["custom"]
    for name in ("small", "large"):
        members = (groups == name).to_numpy()
        entry = report["groups"][name]["accuracy"]
        assert_normal_interval(entry["value"], entry["ci_low"], entry["ci_high"],
                               binomial_se(labels[members], predicted[members]))



@pytest.mark.parametrize("seed, decimals, specificity", [(0, 3, 0.85), (1, 1, 0.85), (2, 2, 0.5), (3, 3, 0.99), (4, 1, 0.0)])
def test_sensitivity_at_specificity_is_the_best_roc_point_of_sklearn_on_that_side(seed, decimals, specificity):
    rng = np.random.default_rng(seed)
    positive = rng.random(120) < 0.35
    score = np.round(rng.normal(positive * 0.8, 1.0), decimals)  # few decimals: many ties across the classes
    fpr, tpr, _ = roc_curve(positive, score, drop_intermediate=False)
    expected = tpr[1 - fpr >= specificity].max()
    assert stats.sensitivity_at_specificity(positive, score, specificity) == pytest.approx(expected)


def test_sensitivity_at_specificity_on_a_hand_counted_case():
    positive = np.array([True, True, True, True, False, False, False, False])
    score = np.array([0.9, 0.8, 0.4, 0.2, 0.7, 0.3, 0.3, 0.1])
    # t = 0.8: specificity 4/4, sensitivity 2/4; t = 0.4: 3/4 and 3/4; t = 0.3: 1/4 and 3/4; t = 0.2: 1/4 and 4/4
    assert stats.sensitivity_at_specificity(positive, score, 1.0) == 0.5
    assert stats.sensitivity_at_specificity(positive, score, 0.75) == 0.75
    assert stats.sensitivity_at_specificity(positive, score, 0.25) == 1.0
    with pytest.raises(ValueError, match="positives and negatives"):
        stats.sensitivity_at_specificity(positive[:4], score[:4], 0.5)
