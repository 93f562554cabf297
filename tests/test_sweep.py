"""A DVC-native sweep, as the README shows it: queue two values, run the queue, compare the experiments.

Also the check that ``dvc exp show`` stays readable: its metric columns are the headline
scores and the training summaries, not every number the reports hold. And the leave-one-collection-out
sweep of benchmarks/README.md on real collections, gathered by ``benchmarks/leave_one_out.py``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr.approaches import APPROACHES, ENSEMBLE
from cxr.files import read_json

from test_pipeline import MINI_MANIFEST, MINI_ZIP, ROOT, copy_project, make_project, sh

pytestmark = pytest.mark.slow

WIDTHS = (6, 10)  # train_custom.width of the two queued experiments (the project's own is 8)
HEADLINE = "metrics/headline.json"
TRAINING = [f"dvclive/{approach}/metrics.json" for approach in APPROACHES]
PER_MODEL = ("acc", "acc_lo", "acc_hi", "f1", "f1_lo", "f1_hi", "covid_sens", "ece")
HELD_OUT = "waliatushar/ai-pneumonia-detection"  # 8 test films (4 NORMAL, 4 PNEUMONIA) in the mini manifest
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


@pytest.mark.skipif(not MINI_MANIFEST.is_file(), reason="../shared/data/cxr3-mini/manifest.csv not present")
def test_leave_one_out_sweep_queued_as_documented_is_gathered_into_the_table(tmp_path):
    """benchmarks/README.md's sweep on real collections: the baseline commit has no groups, the two queued runs set
    them with -S (one holds a pediatric collection out), and ``leave_one_out.py`` reads the finished experiments
    into one row whose scores are recomputed here from each experiment's own predictions."""
    project = make_project(tmp_path, MINI_ZIP, image_size=64, epochs=1)
    recipe = ["-S", f"groups.csv={MINI_MANIFEST}", "-S", "groups.min_images=2"]
    sh(project, "dvc", "exp", "run", "--queue", "-n", "loo-all", *recipe, "-S", "split.unseen_groups=[]")
    sh(project, "dvc", "exp", "run", "--queue", "-n", "loo-one", *recipe, "-S", f'split.unseen_groups=["{HELD_OUT}"]')
    sh(project, "dvc", "queue", "start")
    status = _wait_for_the_queue(project)
    assert status.count("Success") == 2, status

    out = tmp_path / "leave_one_out.json"
    table = sh(project, sys.executable, str(ROOT / "benchmarks" / "leave_one_out.py"), "--out", str(out))
    (row,) = read_json(out)["rows"]
    assert (row["collection"], row["unseen_run"], row["seen_run"]) == (HELD_OUT, "loo-one", "loo-all")
    films = pd.read_csv(MINI_MANIFEST).query("source_repo == @HELD_OUT")
    assert row["images"] == int((films["split"] == "test").sum()) == 8
    assert f"| {HELD_OUT} | 8 | loo-one | loo-all |" in table

    for run, side in (("loo-one", "unseen"), ("loo-all", "seen")):
        sh(project, "dvc", "exp", "apply", run)
        held_out = read_json(project / "reports" / "split.json")["unseen_groups"]
        assert list(held_out) == ([HELD_OUT] if side == "unseen" else [])
        predictions = pd.read_csv(project / "metrics" / "predictions" / "custom.csv")
        mine = predictions[("Data/" + predictions["path"]).isin(films["file"])]
        assert row[side]["accuracy"]["value"] == pytest.approx((mine["label"] == mine["predicted"]).mean(), abs=1e-6)
        pneumonia = mine[mine["label"] == "PNEUMONIA"]
        sensitivity = (pneumonia["predicted"] == "PNEUMONIA").mean()
        assert row[side]["pneumonia_sensitivity"]["value"] == pytest.approx(sensitivity, abs=1e-6)
        score = mine["prob_PNEUMONIA"] / (mine["prob_PNEUMONIA"] + mine["prob_NORMAL"])
        auc = roc_auc_score(mine["label"] == "PNEUMONIA", score)
        assert row[side]["pneumonia_vs_normal_auc"]["value"] == pytest.approx(auc, abs=1e-6)
    assert row["drop"]["accuracy"] == pytest.approx(row["seen"]["accuracy"]["value"] - row["unseen"]["accuracy"]["value"])
