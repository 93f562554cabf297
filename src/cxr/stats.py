"""Statistics for an honest comparison of the three models on one shared test set.

A single accuracy number per model hides how uncertain it is and whether two models really
differ. These functions give the pieces a report needs: bootstrap confidence intervals,
paired exact McNemar tests with a Holm correction for the several pairs compared,
calibration (ECE, reliability bins, temperature scaling) and one-vs-rest ROC AUC.

Conventions: labels are integer class indices (position in the fixed class list, see
:func:`encode_labels`); ``probs`` are ``(n_samples, n_classes)`` arrays whose columns follow
the same order. Everything here is plain numpy/scipy/scikit-learn so it runs without torch.
"""

from collections.abc import Callable, Mapping, Sequence
from itertools import combinations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from cxr.errors import PipelineError

Metric = Callable[[np.ndarray, np.ndarray], float]

_PROBABILITY_FLOOR = 1e-12
_LOG_TEMPERATURE_BOUNDS = (np.log(1e-2), np.log(1e2))


def encode_labels(labels: Sequence[str] | np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Turn class names (as stored in the predictions CSV) into integer class indices.

    Every function in this module works on indices, so this is the one place where an
    unexpected label name in a CSV is caught and reported.
    """
    index_of = {name: position for position, name in enumerate(classes)}
    unknown = sorted({str(label) for label in labels if label not in index_of})
    if unknown:
        raise PipelineError(f"unknown class label(s) {unknown}; expected one of {list(classes)}")
    return np.array([index_of[label] for label in labels], dtype=np.int64)


# ---------------------------------------------------------------------------------------
# Metrics: numpy confusion-matrix counting so that 1,000 bootstrap resamples stay fast.
# They give the same numbers as scikit-learn with zero_division=0.
# ---------------------------------------------------------------------------------------


def _confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts[i, j] = number of samples of true class i predicted as class j (classes 0 .. n_classes - 1)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    counts = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator with 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    numerator = np.asarray(numerator, dtype=float)
    denominator = np.asarray(denominator, dtype=float)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of samples whose predicted class index equals the true one."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def macro_f1_over(class_indices: Sequence[int], n_classes: int) -> Metric:
    """Metric giving the unweighted mean F1 over ``class_indices``, whether or not they occur.

    The one macro-F1 rule of the report: ``sklearn.metrics.f1_score(average="macro",
    labels=class_indices, zero_division=0)``. A listed class absent from both the truth and
    the predictions counts with F1 = 0, so a score never rises because a class went missing;
    errors into a class that is not listed still lower the recall of the true class.
    """
    chosen = np.asarray(class_indices, dtype=np.int64)

    def f1_macro(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        counts = _confusion_matrix(y_true, y_pred, n_classes)
        per_class_total = (counts.sum(axis=0) + counts.sum(axis=1))[chosen]
        return float(_safe_ratio(2 * np.diag(counts)[chosen], per_class_total).mean())

    return f1_macro


def macro_f1(n_classes: int) -> Metric:
    """Metric giving the macro-F1 over all ``n_classes`` classes (see :func:`macro_f1_over`), as the results table has it."""
    return macro_f1_over(range(n_classes), n_classes)


def class_recall(class_index: int) -> Metric:
    """Metric giving the recall (sensitivity) of one class; 0 when that class is absent."""

    def recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        y_true = np.asarray(y_true)
        is_class = y_true == class_index
        hits = np.sum(is_class & (np.asarray(y_pred) == class_index))
        return float(_safe_ratio(hits, is_class.sum()))

    recall.__name__ = f"recall_class_{class_index}"
    return recall


def class_precision(class_index: int) -> Metric:
    """Metric giving the precision of one class; 0 when that class is never predicted."""

    def precision(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        predicted_as_class = np.asarray(y_pred) == class_index
        hits = np.sum(predicted_as_class & (np.asarray(y_true) == class_index))
        return float(_safe_ratio(hits, predicted_as_class.sum()))

    precision.__name__ = f"precision_class_{class_index}"
    return precision


# ---------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# ---------------------------------------------------------------------------------------


def _check_paired(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    if len(y_true) == 0:
        raise ValueError("cannot compute a statistic on zero samples")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} samples but y_pred has {len(y_pred)}")


def bootstrap_replicates(
    y_true: np.ndarray, y_pred: np.ndarray, metric: Metric, n_resamples: int, rng: np.random.Generator,
    stratify: bool = True,
) -> np.ndarray:
    """``metric`` on ``n_resamples`` bootstrap resamples of the rows, drawn from ``rng``.

    With ``stratify`` each true class is resampled within itself, keeping its size. Shared by
    :func:`bootstrap_ci` and any interval built from replicates (a difference of two test sets).
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    _check_paired(y_true, y_pred)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if stratify:
        groups = [np.flatnonzero(y_true == label) for label in np.unique(y_true)]
    else:
        groups = [np.arange(len(y_true))]
    replicates = np.empty(n_resamples)
    for i in range(n_resamples):
        indices = np.concatenate([group[rng.integers(0, len(group), size=len(group))] for group in groups])
        replicates[i] = metric(y_true[indices], y_pred[indices])
    return replicates


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    metric: Metric,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    stratify: bool = True,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval for ``metric``: returns (point estimate, low, high).

    With ``stratify`` the test images are resampled within each true class, so every
    resample has the same class mix as the real test set; that keeps per-class metrics
    defined and stops the interval from mixing in class-balance noise the test set
    does not have. ``y_pred`` may be 2-D (e.g. probabilities); its rows are resampled.
    The same ``seed`` always gives the same interval.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    replicates = bootstrap_replicates(y_true, y_pred, metric, n_resamples, np.random.default_rng(seed), stratify)
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return float(metric(np.asarray(y_true), np.asarray(y_pred))), float(low), float(high)


# ---------------------------------------------------------------------------------------
# Paired significance tests
# ---------------------------------------------------------------------------------------


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float | int]:
    """Exact McNemar test for two models scored on the same images.

    Only the discordant images carry information: ``b`` = A right and B wrong,
    ``c`` = A wrong and B right. Under "equally accurate" each discordant image is a fair
    coin flip, so the two-sided exact binomial test on min(b, c) out of b + c gives the
    p-value (1.0 when the models never disagree).
    """
    correct_a = np.asarray(correct_a, dtype=bool)
    correct_b = np.asarray(correct_b, dtype=bool)
    _check_paired(correct_a, correct_b)
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    n_discordant = b + c
    p_value = 1.0 if n_discordant == 0 else float(binomtest(min(b, c), n=n_discordant, p=0.5).pvalue)
    return {"b": b, "c": c, "n_discordant": n_discordant, "p_value": p_value}


def pairwise_mcnemar(correct_by_model: Mapping[str, np.ndarray]) -> dict[tuple[str, str], dict[str, float | int]]:
    """:func:`mcnemar_exact` for every pair of models, keyed (model A, model B) in input order."""
    return {
        (name_a, name_b): mcnemar_exact(correct_by_model[name_a], correct_by_model[name_b])
        for name_a, name_b in combinations(correct_by_model, 2)
    }


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values, same keys as the input.

    Comparing three models means three tests, so raw p-values overstate the evidence.
    Holm controls the family-wise error rate and is never less powerful than Bonferroni.
    The k-th smallest p is multiplied by (m - k + 1), then made non-decreasing and capped at 1.
    """
    names = sorted(p_values, key=lambda name: p_values[name])
    n_tests = len(names)
    adjusted: dict[str, float] = {}
    running_max = 0.0
    for rank, name in enumerate(names):
        running_max = max(running_max, min(1.0, (n_tests - rank) * float(p_values[name])))
        adjusted[name] = running_max
    return {name: adjusted[name] for name in p_values}


def _format_p(p_value: float) -> str:
    return "p < 0.001" if p_value < 0.001 else f"p = {p_value:.3f}"


def significance_sentences(
    results: Mapping[tuple[str, str], Mapping[str, float]], alpha: float = 0.05
) -> list[str]:
    """One plain-English sentence per model pair, with Holm adjustment across all pairs.

    ``results`` maps (model A, model B) to the output of :func:`mcnemar_exact` for
    (A's correctness, B's correctness). Example::

        Fine-tuning vs Custom CNN: 41 vs 23 discordant images (right only by Fine-tuning vs
        right only by Custom CNN), exact McNemar p = 0.033, Holm-adjusted p = 0.066:
        not significant at 0.05.
    """
    adjusted = holm({f"{a} vs {b}": result["p_value"] for (a, b), result in results.items()})
    sentences = []
    for (name_a, name_b), result in results.items():
        adjusted_p = adjusted[f"{name_a} vs {name_b}"]
        b, c = int(result["b"]), int(result["c"])
        if adjusted_p < alpha:
            better = name_a if b > c else name_b
            verdict = f"significant at {alpha:g} ({better} is more accurate)"
        else:
            verdict = f"not significant at {alpha:g}"
        sentences.append(
            f"{name_a} vs {name_b}: {b} vs {c} discordant images "
            f"(right only by {name_a} vs right only by {name_b}), "
            f"exact McNemar {_format_p(result['p_value'])}, "
            f"Holm-adjusted {_format_p(adjusted_p)}: {verdict}."
        )
    return sentences


# ---------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------


def _check_probs(probs: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=float)
    y_true = np.asarray(y_true, dtype=np.int64)
    if probs.ndim != 2:
        raise ValueError(f"expected a (n_samples, n_classes) array, got shape {probs.shape}")
    _check_paired(y_true, probs)
    if y_true.min() < 0 or y_true.max() >= probs.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {probs.shape[1]}), got {np.unique(y_true)}")
    return probs, y_true


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin mean confidence, accuracy and count of the top-label predictions.

    Bins split [0, 1] into ``n_bins`` equal-width intervals, closed on the right
    ((0, 1/n], (1/n, 2/n], ...). Empty bins have count 0 and NaN confidence/accuracy,
    so a reliability diagram can skip them. Keys: ``bin_lower``, ``bin_upper``,
    ``confidence``, ``accuracy``, ``count``.
    """
    probs, y_true = _check_probs(probs, y_true)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_index = np.searchsorted(edges[1:-1], confidence, side="left")

    count = np.bincount(bin_index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bin_index, weights=confidence, minlength=n_bins) / count
        mean_accuracy = np.bincount(bin_index, weights=correct, minlength=n_bins) / count
    return {
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "confidence": mean_confidence,
        "accuracy": mean_accuracy,
        "count": count,
    }


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: count-weighted mean |accuracy - confidence| over equal-width bins.

    0 means the stated confidence matches how often the model is right; an over-confident
    model (confidence well above accuracy) gets a large value.
    """
    bins = reliability_bins(probs, y_true, n_bins)
    filled = bins["count"] > 0
    weights = bins["count"][filled] / bins["count"].sum()
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(weights * gaps))


def logits_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities, usable wherever this module expects logits.

    softmax(z) is unchanged by adding a constant to a row of z, and log softmax(z) is
    z minus its row's log-sum-exp, so log(p) are the model's logits up to a per-row
    constant: temperature scaling fitted on them gives the same T and the same
    probabilities. Probabilities are floored at 1e-12 so an exact 0 stays finite.
    """
    return np.log(np.clip(np.asarray(probs, dtype=float), _PROBABILITY_FLOOR, None))


def _mean_nll(logits: np.ndarray, y_true: np.ndarray, temperature: float) -> float:
    log_probs = log_softmax(logits / temperature, axis=1)
    return float(-np.mean(log_probs[np.arange(len(y_true)), y_true]))


def negative_log_likelihood(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean cross-entropy of softmax(logits / temperature) against the true classes."""
    logits, y_true = _check_probs(logits, y_true)
    return _mean_nll(logits, y_true, temperature)


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The single temperature T > 0 that minimises the NLL of softmax(logits / T).

    Fit it on validation predictions, never on the test set. T > 1 softens an
    over-confident model, T < 1 sharpens an under-confident one; the predicted class
    never changes. The search runs over log T in [log 0.01, log 100] so T stays positive.
    If only probabilities were stored, pass :func:`logits_from_probabilities` of them.
    """
    logits, y_true = _check_probs(logits, y_true)
    result = minimize_scalar(
        lambda log_t: _mean_nll(logits, y_true, float(np.exp(log_t))),
        bounds=_LOG_TEMPERATURE_BOUNDS,
        method="bounded",
    )
    return float(np.exp(result.x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax probabilities of logits / temperature (log-probabilities work as logits too)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return softmax(np.asarray(logits, dtype=float) / temperature, axis=1)


# ---------------------------------------------------------------------------------------
# ROC AUC
# ---------------------------------------------------------------------------------------


def roc_auc_per_class(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """One-vs-rest ROC AUC for each class, plus their unweighted mean under "macro".

    A class that is absent from ``y_true`` (or is the only class present) has no
    negatives or no positives, so its AUC is undefined: it is reported as NaN and left
    out of the macro mean, instead of making the whole computation fail. When every class
    is present, "macro" equals scikit-learn's ``roc_auc_score(multi_class="ovr")``.
    """
    probs, y_true = _check_probs(probs, y_true)
    if len(classes) != probs.shape[1]:
        raise ValueError(f"{len(classes)} class names for {probs.shape[1]} probability columns")
    per_class: dict[str, float] = {}
    for index, name in enumerate(classes):
        is_class = y_true == index
        if is_class.all() or not is_class.any():
            per_class[name] = float("nan")
        else:
            per_class[name] = float(roc_auc_score(is_class, probs[:, index]))
    defined = [auc for auc in per_class.values() if not np.isnan(auc)]
    per_class["macro"] = float(np.mean(defined)) if defined else float("nan")
    return per_class


def sensitivity_at_specificity(positive: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """The highest sensitivity any threshold on ``score`` reaches while keeping at least ``specificity``.

    The best point of the ROC curve on that side of the specificity line: it says whether a target
    operating point (say 0.70 sensitivity at 0.85 specificity) is reachable by moving the threshold
    alone. If even the best threshold misses it, the model's ranking is the limit, not where its
    threshold sits. A threshold t calls a film positive when its score is at least t, so tied scores
    move together, as on ``sklearn.metrics.roc_curve``.
    """
    positive, score = np.asarray(positive, dtype=bool), np.asarray(score, dtype=float)
    if positive.all() or not positive.any():
        raise ValueError("sensitivity at a specificity needs positives and negatives")
    thresholds = np.append(np.unique(score), np.inf)
    negatives, positives = np.sort(score[~positive]), np.sort(score[positive])
    specificities = np.searchsorted(negatives, thresholds, side="left") / len(negatives)  # share of negatives below t
    sensitivities = 1 - np.searchsorted(positives, thresholds, side="left") / len(positives)  # share at or above t
    return float(sensitivities[specificities >= specificity].max())
