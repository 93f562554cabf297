"""``benchmarks/decision_rule.py``: one weight on P(PNEUMONIA) for every film, chosen on validation.

Predictions, macro-F1, sensitivity and specificity are checked against numpy and scikit-learn on
hand-made films, and the chosen weight against the interval a hand count allows.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, recall_score

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]


def _script():
    spec = importlib.util.spec_from_file_location("decision_rule", ROOT / "benchmarks" / "decision_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _films(rows: list[tuple[str, str, float, float, float]]) -> pd.DataFrame:
    """(group, label, P(COVID19), P(NORMAL), P(PNEUMONIA)) per film."""
    frame = pd.DataFrame(rows, columns=["group", "label", *(f"prob_{name}" for name in CLASSES)])
    frame.insert(0, "path", [f"f{i:02d}.jpg" for i in range(len(frame))])
    probabilities = frame[[f"prob_{name}" for name in CLASSES]].to_numpy()
    frame.insert(2, "predicted", np.asarray(CLASSES)[probabilities.argmax(1)])
    return frame


NIH = "muhammedtalo/COVID-19"
# NIH PNEUMONIA films turn PNEUMONIA above w = 1.5 and w = 4; NIH NORMAL films above w = 9 (three) and 7/3 (one)
VAL = _films([(NIH, "PNEUMONIA", 0.0, 0.6, 0.4), (NIH, "PNEUMONIA", 0.0, 0.8, 0.2),
              (NIH, "NORMAL", 0.0, 0.9, 0.1), (NIH, "NORMAL", 0.0, 0.9, 0.1), (NIH, "NORMAL", 0.0, 0.9, 0.1),
              (NIH, "NORMAL", 0.0, 0.7, 0.3),
              ("kids", "PNEUMONIA", 0.05, 0.15, 0.8), ("kids", "NORMAL", 0.1, 0.85, 0.05),
              ("kids", "COVID19", 0.5, 0.1, 0.4), ("kids", "COVID19", 0.9, 0.05, 0.05)])


@pytest.mark.parametrize("weight", [1.0, 1.3, 2.0, 5.0, 12.0])
def test_weighted_predictions_and_scores_match_numpy_and_sklearn(weight):
    module = _script()
    probabilities = VAL[[f"prob_{name}" for name in CLASSES]].to_numpy() * [1, 1, weight]
    expected = probabilities.argmax(1)
    assert list(module.weighted_predictions(VAL, CLASSES, weight)) == list(expected)
    scores = module.rule_scores(VAL, CLASSES, weight, NIH)
    truth = np.array([CLASSES.index(label) for label in VAL["label"]])
    assert scores["macro_f1"] == pytest.approx(f1_score(truth, expected, average="macro", labels=[0, 1, 2]))
    nih = (VAL["group"] == NIH).to_numpy()
    assert scores["sensitivity"] == pytest.approx(recall_score(truth[nih] == 2, expected[nih] == 2))
    assert scores["specificity"] == pytest.approx(np.mean(expected[nih & (truth == 1)] != 2))


def test_the_weight_is_the_smallest_that_gains_sensitivity_without_losing_specificity():
    module = _script()
    # specificity >= 0.85 needs every NIH NORMAL film kept (3/4 < 0.85): w <= 7/3; above 1.5 one of two
    # PNEUMONIA films is caught, so the smallest grid weight above 1.5 is chosen
    chosen = module.chosen_weight(VAL, CLASSES, NIH)
    assert chosen == pytest.approx(module.WEIGHTS[module.WEIGHTS > 1.5][0])
    assert chosen <= 7 / 3
    assert module.rule_scores(VAL, CLASSES, chosen, NIH)["sensitivity"] == 0.5
    no_normal_kept = VAL.assign(**{"prob_PNEUMONIA": VAL["prob_PNEUMONIA"].where(VAL["label"] != "NORMAL", 0.95),
                                   "prob_NORMAL": VAL["prob_NORMAL"].where(VAL["label"] != "NORMAL", 0.05)})
    assert module.chosen_weight(no_normal_kept, CLASSES, NIH) is None


def _scores(folder: Path, val: pd.DataFrame, test: pd.DataFrame) -> Path:
    folder.mkdir(parents=True)
    path = folder / "scores.json"
    path.write_text(json.dumps({"keep-none-36": {"val": {"films": val.to_dict("records")},
                                                 "test": {"films": test.to_dict("records")}}}))
    return path


def test_the_script_scores_each_model_and_their_mean_at_both_weights(tmp_path, capsys):
    module = _script()
    other = VAL.assign(prob_NORMAL=VAL["prob_NORMAL"] - 0.05, prob_PNEUMONIA=VAL["prob_PNEUMONIA"] + 0.05)
    a = _scores(tmp_path / "a", VAL, VAL.iloc[::-1])  # order does not matter: films are matched by path
    b = _scores(tmp_path / "b", other, other)

    rows = module.main(["--scores", str(a), str(b)])

    assert set(rows) == {"a/keep-none-36", "b/keep-none-36", module.ENSEMBLE}
    assert [entry["weight"] for entry in rows["a/keep-none-36"]] == [1.0, module.chosen_weight(VAL, CLASSES, NIH)]
    mean = VAL.assign(prob_NORMAL=VAL["prob_NORMAL"] - 0.025, prob_PNEUMONIA=VAL["prob_PNEUMONIA"] + 0.025)
    for entry in rows[module.ENSEMBLE]:
        assert entry["test"] == pytest.approx(module.rule_scores(mean, CLASSES, entry["weight"], NIH))
    assert "| a/keep-none-36 | 1.00 |" in capsys.readouterr().out


def test_scores_without_every_film_name_the_file_and_the_fix(tmp_path, capsys):
    module = _script()
    path = tmp_path / "old" / "scores.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"keep-none-36": {"val": {"focus_group": NIH}, "test": {"focus_group": NIH}}}))
    with pytest.raises(SystemExit):
        module.run(lambda: module.main(["--scores", str(path)]))
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: option keep-none-36 has no scored films for every split; " \
                  "rescore it with benchmarks/training_options.py"
