"""Tests for cxr.stats: known textbook values and synthetic predictors with known behaviour."""

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from cxr import stats
from cxr.errors import PipelineError

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]


def synthetic_predictions(n: int, accuracy: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three-class labels and predictions that are right for exactly round(accuracy * n) samples."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, size=n)
    y_pred = y_true.copy()
    wrong = rng.permutation(n)[: n - round(accuracy * n)]
    y_pred[wrong] = (y_true[wrong] + rng.integers(1, 3, size=len(wrong))) % 3
    return y_true, y_pred


def test_encode_labels_maps_names_and_rejects_unknown():
    assert stats.encode_labels(["NORMAL", "COVID19", "PNEUMONIA"], CLASSES).tolist() == [1, 0, 2]
    with pytest.raises(PipelineError, match="TUBERCULOSIS"):
        stats.encode_labels(["NORMAL", "TUBERCULOSIS"], CLASSES)


def test_numpy_metrics_match_sklearn_with_zero_division_0():
    y_true, y_pred = synthetic_predictions(300, 0.7, seed=1)
    y_pred[y_pred == 2] = 0  # class 2 is never predicted: precision 0, F1 0, still in the macro mean
    assert stats.accuracy(y_true, y_pred) == pytest.approx(np.mean(y_true == y_pred))
    assert stats.macro_f1(3)(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    for k in range(3):
        assert stats.class_recall(k)(y_true, y_pred) == pytest.approx(
            recall_score(y_true, y_pred, labels=[k], average="macro", zero_division=0)
        )
        assert stats.class_precision(k)(y_true, y_pred) == pytest.approx(
            precision_score(y_true, y_pred, labels=[k], average="macro", zero_division=0)
        )


def test_macro_f1_counts_a_class_absent_from_truth_and_predictions_as_zero():
    y_true = np.array([0, 0, 2, 2])
    y_pred = np.array([0, 2, 2, 2])
    # F1 per class: 2 * 1 / (2 + 1), 0 (never true nor predicted), 2 * 2 / (2 + 3); sklearn with labels=all classes.
    assert stats.macro_f1(3)(y_true, y_pred) == pytest.approx((2 / 3 + 0 + 4 / 5) / 3)
    assert stats.macro_f1(3)(y_true, y_pred) == pytest.approx(
        f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0))
    assert stats.macro_f1_over([0, 2], 3)(y_true, y_pred) == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_bootstrap_interval_contains_estimate_and_shrinks_with_more_samples():
    widths = {}
    for n in (200, 5000):
        y_true, y_pred = synthetic_predictions(n, 0.9, seed=n)
        point, low, high = stats.bootstrap_ci(y_true, y_pred, stats.accuracy, n_resamples=500, seed=0)
        assert point == pytest.approx(0.9)
        assert low < point < high
        widths[n] = high - low
    # Width scales like 1/sqrt(n): 25x the samples should give roughly a fifth of the width.
    assert widths[5000] < widths[200] / 3


def test_bootstrap_is_deterministic_for_a_seed_and_changes_with_it():
    y_true, y_pred = synthetic_predictions(300, 0.8, seed=3)
    first = stats.bootstrap_ci(y_true, y_pred, stats.macro_f1(3), n_resamples=200, seed=7)
    again = stats.bootstrap_ci(y_true, y_pred, stats.macro_f1(3), n_resamples=200, seed=7)
    other = stats.bootstrap_ci(y_true, y_pred, stats.macro_f1(3), n_resamples=200, seed=8)
    assert first == again
    assert first[1:] != other[1:]


def test_stratified_bootstrap_preserves_class_sizes():
    y_true, y_pred = synthetic_predictions(300, 0.8, seed=4)
    size_of_class_0 = float(np.sum(y_true == 0))

    def count_class_0(labels: np.ndarray, _predictions: np.ndarray) -> float:
        return float(np.sum(labels == 0))

    stratified = stats.bootstrap_ci(y_true, y_pred, count_class_0, n_resamples=100, stratify=True)
    plain = stats.bootstrap_ci(y_true, y_pred, count_class_0, n_resamples=100, stratify=False)
    assert stratified == (size_of_class_0, size_of_class_0, size_of_class_0)
    assert plain[1] < size_of_class_0 < plain[2]


def test_bootstrap_resamples_rows_of_2d_predictions():
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, 2, size=200)
    scores = np.column_stack([1 - y_true * 0.6 - rng.random(200) * 0.5, rng.random(200)])

    def auc_of_class_1(labels: np.ndarray, probs: np.ndarray) -> float:
        return float(roc_auc_score(labels == 1, -probs[:, 0]))

    point, low, high = stats.bootstrap_ci(y_true, scores, auc_of_class_1, n_resamples=100)
    assert low <= point <= high <= 1.0


def test_mcnemar_exact_matches_textbook_value():
    # b = 1 (A right, B wrong), c = 9 (A wrong, B right), plus 20 concordant images.
    correct_a = np.array([True] * 1 + [False] * 9 + [True] * 10 + [False] * 10)
    correct_b = np.array([False] * 1 + [True] * 9 + [True] * 10 + [False] * 10)
    result = stats.mcnemar_exact(correct_a, correct_b)
    assert (result["b"], result["c"], result["n_discordant"]) == (1, 9, 10)
    assert result["p_value"] == pytest.approx(0.021484375)


def test_mcnemar_without_disagreement_has_p_value_1():
    correct = np.array([True, False, True])
    assert stats.mcnemar_exact(correct, correct)["p_value"] == 1.0


def test_pairwise_mcnemar_covers_every_pair_once():
    correct = {"A": np.array([True, False]), "B": np.array([True, True]), "C": np.array([False, True])}
    assert list(stats.pairwise_mcnemar(correct)) == [("A", "B"), ("A", "C"), ("B", "C")]


def test_holm_on_known_example():
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    # Sorted: d*4 = 0.02, a*3 = 0.03, c*2 = 0.06, b*1 = 0.04 -> raised to 0.06 to stay monotone.
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    assert stats.holm({"x": 0.6, "y": 0.7}) == pytest.approx({"x": 1.0, "y": 1.0})


def test_significance_sentences_report_counts_and_adjusted_verdicts():
    results = {
        ("Fine-tuning", "Custom CNN"): {"b": 41, "c": 23, "p_value": 0.033},
        ("Fine-tuning", "Feature extraction"): {"b": 30, "c": 5, "p_value": 0.0001},
    }
    first, second = stats.significance_sentences(results, alpha=0.05)
    assert first.startswith("Fine-tuning vs Custom CNN: 41 vs 23 discordant images")
    assert "exact McNemar p = 0.033, Holm-adjusted p = 0.033: significant at 0.05 (Fine-tuning" in first
    assert "p < 0.001, Holm-adjusted p < 0.001: significant" in second
    strict = stats.significance_sentences(results, alpha=0.01)[0]
    assert strict.endswith("not significant at 0.01.")


def calibrated_predictions() -> tuple[np.ndarray, np.ndarray]:
    """Top confidence 0.8 with exactly 80% right, and 0.6 with exactly 60% right."""
    probs, labels = [], []
    for confidence, n_total in ((0.8, 100), (0.6, 50)):
        n_right = round(confidence * n_total)
        rest = (1 - confidence) / 2
        for i in range(n_total):
            probs.append([confidence, rest, rest])
            labels.append(0 if i < n_right else 1)
    return np.array(probs), np.array(labels)


def test_ece_is_zero_for_a_calibrated_predictor_and_large_when_over_confident():
    probs, labels = calibrated_predictions()
    assert stats.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)

    over_confident = np.tile([0.98, 0.01, 0.01], (100, 1))
    half_right = np.array([0] * 50 + [1] * 50)
    assert stats.expected_calibration_error(over_confident, half_right) == pytest.approx(0.48)


def test_reliability_bins_report_per_bin_confidence_accuracy_and_count():
    probs, labels = calibrated_predictions()
    bins = stats.reliability_bins(probs, labels, n_bins=10)
    filled = np.flatnonzero(bins["count"])
    assert bins["count"].sum() == 150
    assert bins["count"][filled].tolist() == [50, 100]
    assert bins["confidence"][filled] == pytest.approx([0.6, 0.8])
    assert bins["accuracy"][filled] == pytest.approx([0.6, 0.8])
    assert np.isnan(bins["accuracy"][0])
    for lower, upper, confidence in zip(bins["bin_lower"][filled], bins["bin_upper"][filled], [0.6, 0.8]):
        assert lower < confidence <= upper


def over_confident_logits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), then logits 3z: a model three times too sure of itself."""
    rng = np.random.default_rng(seed)
    calibrated = rng.normal(0, 1.5, size=(2000, 3))
    cumulative = softmax(calibrated, axis=1).cumsum(axis=1)
    labels = (rng.random((2000, 1)) > cumulative).sum(axis=1)
    return 3 * calibrated, labels


def test_temperature_scaling_softens_over_confident_logits_and_lowers_nll():
    logits, labels = over_confident_logits(seed=6)
    temperature = stats.fit_temperature(logits, labels)
    assert 2.5 < temperature < 3.5
    assert stats.negative_log_likelihood(logits, labels, temperature) < stats.negative_log_likelihood(logits, labels)
    scaled = stats.apply_temperature(logits, temperature)
    assert scaled.sum(axis=1) == pytest.approx(np.ones(len(labels)))
    assert (scaled.argmax(axis=1) == logits.argmax(axis=1)).all()
    assert stats.expected_calibration_error(scaled, labels) < stats.expected_calibration_error(
        softmax(logits, axis=1), labels
    )


def test_temperature_fitted_on_probabilities_matches_logits():
    logits, labels = over_confident_logits(seed=7)
    from_logits = stats.fit_temperature(logits, labels)
    log_probs = stats.logits_from_probabilities(softmax(logits, axis=1))
    assert stats.fit_temperature(log_probs, labels) == pytest.approx(from_logits, rel=1e-3)
    assert stats.apply_temperature(log_probs, from_logits) == pytest.approx(
        stats.apply_temperature(logits, from_logits), abs=1e-6
    )


def test_apply_temperature_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="positive"):
        stats.apply_temperature(np.zeros((2, 3)), 0.0)


def test_auc_is_one_for_perfectly_separated_scores():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[labels] * 0.7 + 0.1
    result = stats.roc_auc_per_class(labels, probs, CLASSES)
    assert result == pytest.approx({"COVID19": 1.0, "NORMAL": 1.0, "PNEUMONIA": 1.0, "macro": 1.0})


def test_auc_macro_matches_sklearn_when_every_class_is_present():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 3, size=300)
    probs = softmax(np.eye(3)[labels] + rng.normal(0, 1, size=(300, 3)), axis=1)
    result = stats.roc_auc_per_class(labels, probs, CLASSES)
    assert result["macro"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def test_auc_of_an_absent_class_is_nan_and_left_out_of_macro():
    labels = np.array([0, 0, 2, 2, 0, 2])
    probs = np.array([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.2, 0.1, 0.7],
                      [0.1, 0.3, 0.6], [0.4, 0.0, 0.6], [0.3, 0.2, 0.5]])  # fmt: skip
    result = stats.roc_auc_per_class(labels, probs, CLASSES)
    assert np.isnan(result["NORMAL"])
    assert result["COVID19"] == pytest.approx(1.0)
    # Positives 0.7, 0.6, 0.5 against the negative scored 0.6: one win, one tie, one loss.
    assert result["PNEUMONIA"] == pytest.approx(7.5 / 9)
    assert result["macro"] == pytest.approx((1.0 + 7.5 / 9) / 2)
