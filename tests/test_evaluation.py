"""Scores, predictions tables and the comparison table."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from cxr.evaluation.inference import predict_split
from cxr.evaluation.predictions import predictions_frame, probabilities_of
from cxr.params import CLASSES
from cxr.reporting.comparison import model_report
from cxr.reporting.scores import classification_metrics
from cxr.reporting.tables import bar_chart, summary_markdown, summary_table, to_markdown
from cxr.training.models import build_model

from conftest import write_processed


def test_metrics_match_scikit_learn_and_list_an_absent_class():
    true = ["COVID19", "COVID19", "NORMAL", "NORMAL", "NORMAL", "COVID19"]
    pred = ["COVID19", "NORMAL", "NORMAL", "NORMAL", "COVID19", "COVID19"]
    scores = classification_metrics(true, pred, CLASSES)
    labels = list(CLASSES)
    assert scores["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    assert scores["f1_macro"] == pytest.approx(f1_score(true, pred, labels=labels, average="macro", zero_division=0), abs=1e-6)
    assert scores["precision_macro"] == pytest.approx(
        precision_score(true, pred, labels=labels, average="macro", zero_division=0), abs=1e-6
    )
    assert scores["recall_macro"] == pytest.approx(
        recall_score(true, pred, labels=labels, average="macro", zero_division=0), abs=1e-6
    )
    assert scores["per_class"]["PNEUMONIA"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert scores["confusion_matrix"]["rows_true_columns_predicted"] == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]


def test_channels_last_evaluation_gives_the_contiguous_probabilities(tmp_path):
    write_processed(tmp_path, {"test": 5})
    torch.manual_seed(0)
    model = build_model("custom_cnn", 3, [0.5], [0.2], width=8).eval()
    checkpoint = {"approach": "custom", "image_size": 32}
    tables = [
        predict_split(model.to(memory_format=layout), checkpoint, tmp_path, "test", CLASSES, 4, torch.device("cpu"),
                      memory_format=layout).table
        for layout in (torch.contiguous_format, torch.channels_last)
    ]
    assert len(tables[0]) == 15
    np.testing.assert_allclose(probabilities_of(tables[1], CLASSES), probabilities_of(tables[0], CLASSES), atol=1e-5)


def test_predictions_frame_round_trips_probabilities():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    frame = predictions_frame(["a.jpg", "b.jpg"], np.array([0, 1]), probs, CLASSES)
    assert list(frame["predicted"]) == ["COVID19", "PNEUMONIA"]
    assert list(frame["label"]) == ["COVID19", "NORMAL"]
    assert np.allclose(probabilities_of(frame, CLASSES), probs)


def _scores(f1):
    return {"accuracy": f1, "precision_macro": f1, "recall_macro": f1, "f1_macro": f1}


def test_table_has_reference_columns_and_bolds_the_best_row(tmp_path):
    table = summary_table({"custom": _scores(0.9), "extract": _scores(0.8), "finetune": _scores(0.95)})
    assert list(table.columns) == ["Model", "Accuracy", "Precision (Macro)", "Recall (Macro)", "F1-Score (Macro)"]
    lines = to_markdown(table).splitlines()
    assert lines[4].startswith("| **Fine-tuning (ResNet-18)** | **0.9500**")
    assert "**" not in lines[2] + lines[3]
    bar_chart(table, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("tta", "named"), [(["custom"], "Custom CNN."), ([], None)])
def test_summary_says_which_models_were_scored_with_test_time_augmentation(tta, named):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=30)
    frame = predictions_frame([f"{i}.jpg" for i in range(30)], np.arange(30) % 3, probs, CLASSES)
    reports = {"custom": model_report(frame, CLASSES, 10, 0, 5)}
    table = summary_table({"custom": _scores(0.9)})

    text = summary_markdown(table, reports, [], {"custom": 1.0}, CLASSES, 10, tta)

    lines = [line for line in text.splitlines() if "test-time augmentation" in line]
    assert [line.endswith(named) for line in lines] == ([True] if named else [])
