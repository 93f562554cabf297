"""A DVC-native sweep, as the README shows it: queue two values, run the queue, compare the experiments.

Also the check that ``dvc exp show`` stays readable: its metric columns are the headline
scores and the training summaries, not every number the reports hold.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest

from cxr.approaches import APPROACHES, ENSEMBLE

from test_pipeline import copy_project, sh

pytestmark = pytest.mark.slow

WIDTHS = (6, 10)  # train_custom.width of the two queued experiments (the project's own is 8)
HEADLINE = "metrics/headline.json"
TRAINING = [f"dvclive/{approach}/metrics.json" for approach in APPROACHES]
PER_MODEL = ("acc", "acc_lo", "acc_hi", "f1", "f1_lo", "f1_hi", "covid_sens", "ece")
# per model 8 scores, lungs-hidden accuracy of each trained model, the probe's; per training stage 3 numbers
METRIC_COLUMNS = 8 * (len(APPROACHES) + 1) + len(APPROACHES) + 1 + 3 * len(APPROACHES)


def _wait_for_the_queue(project: Path, limit_s: float = 1800) -> str:
    """Poll ``dvc queue status`` until no experiment is queued or running; return the last status."""
    deadline = time.monotonic() + limit_s
    while True:
        status = sh(project, "dvc", "queue", "status")
        if "Queued" not in status and "Running" not in status:
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"the queue did not finish:\n{status}")
        time.sleep(5)


def _metrics(rev: dict) -> dict[str, dict]:
    return {path: entry["data"] for path, entry in (rev["data"].get("metrics") or {}).items()}


def test_queued_sweep_runs_and_lists_both_experiments_with_the_headline(reproduced_mini, tmp_path):
    project = copy_project(reproduced_mini.project, tmp_path / "project")  # the baseline, reproduced
    assert sh(project, "dvc", "status", "--json").strip() == "{}"
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")

    sh(project, "dvc", "exp", "run", "--queue", "-S", f"train_custom.width={WIDTHS[0]},{WIDTHS[1]}")
    sh(project, "dvc", "queue", "start")
    status = _wait_for_the_queue(project)
    assert status.count("Success") == len(WIDTHS), status

    shown = json.loads(sh(project, "dvc", "exp", "show", "--json"))
    baseline = next(entry for entry in shown if entry["rev"] != "workspace")
    experiments = [run["revs"][0] for run in baseline["experiments"] or []]
    widths = sorted(exp["data"]["params"]["params.yaml"]["data"]["train_custom"]["width"] for exp in experiments)
    assert widths == list(WIDTHS)
    for exp in [baseline, *experiments]:
        metrics = _metrics(exp)
        assert sorted(metrics) == sorted([HEADLINE, "metrics/external_scores.json", *TRAINING])
        assert sorted(metrics[HEADLINE]) == sorted(
            [f"{model}.{key}" for model in (*APPROACHES, ENSEMBLE) for key in PER_MODEL]
            + [f"{model}.lungs_hidden_acc" for model in (*APPROACHES, "probe")])
        for path in TRAINING:
            assert sorted(metrics[path]) == ["best_epoch", "best_val_f1", "step"]
        assert sum(len(values) for values in metrics.values()) == METRIC_COLUMNS

    header, *rows = csv.reader(io.StringIO(sh(project, "dvc", "exp", "show", "--csv")))
    metric_columns = header[header.index("Executor") + 1 : header.index("data.source")]
    assert len(metric_columns) == METRIC_COLUMNS
    assert {f"custom.{key}" for key in PER_MODEL} <= set(metric_columns)

    header, *rows = csv.reader(io.StringIO(sh(project, "dvc", "exp", "show", "--csv", "--only-changed")))
    assert sorted(row[header.index("train_custom.width")] for row in rows) == ["10", "6", "8", "8"]  # + workspace
    plots = json.loads(sh(project, "dvc", "plots", "diff", *(exp["rev"] for exp in experiments), "--json"))
    assert sorted(plots["data"]["learning_curves_macro_f1"][0]["revisions"]) == sorted(exp["rev"] for exp in experiments)
