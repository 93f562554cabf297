"""benchmarks/leave_one_out.py: unseen vs seen scores per collection, gathered from DVC experiments.

``data/exp_show_leave_one_out.json`` is real ``dvc exp show --json`` output (DVC 3.67.1), captured
from a toy project whose one stage declares ``metrics/subgroups.json`` as a ``cache: false``
output and has ``groups`` and ``split.unseen_groups`` as params, after:

    dvc exp run --queue -n loo-all -S 'split.unseen_groups=[]' -S groups.csv=/tmp/loo/manifest.csv
    dvc exp run --queue -S 'split.unseen_groups=["org/coll-a"]' -S groups.csv=...   # rimed-gore
    dvc exp run --queue -S 'split.unseen_groups=["org/coll-b"]' -S groups.csv=...   # zinky-view
    dvc exp run --queue -S 'split.unseen_groups=["not/there"]' -S groups.csv=...    # nosed-snow: failed
    dvc queue start
    dvc exp run --queue -S 'split.unseen_groups=["org/coll-a"]' -S ... -S train_custom.epochs=3  # amber-fore: queued
    dvc exp run -n direct -S 'split.unseen_groups=["org/coll-b"]' -S ... -S train_custom.epochs=3  # in the workspace

The baseline commit (master) has ``groups.csv: null``. The scores read at each revision are
written here by hand (or by the real subgroup report), so every expected value is worked out
from them independently of the script.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.errors import PipelineError
from cxr.params import CLASSES
from cxr.reporting.subgroups import subgroup_report

ROOT = Path(__file__).resolve().parents[1]
SHOWN = json.loads((ROOT / "tests" / "data" / "exp_show_leave_one_out.json").read_text())
A, B = "org/coll-a", "org/coll-b"


@pytest.fixture(scope="module")
def loo():
    spec = importlib.util.spec_from_file_location("leave_one_out", ROOT / "benchmarks" / "leave_one_out.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def rev(name: str) -> str:
    """The revision of the experiment called ``name`` in the recorded output."""
    return next(e["revs"][0]["rev"] for e in SHOWN[1]["experiments"] if e["name"] == name)


def without(*names: str) -> list[dict]:
    """The recorded output with the named experiments removed."""
    shown = copy.deepcopy(SHOWN)
    shown[1]["experiments"] = [e for e in shown[1]["experiments"] if e["name"] not in names]
    return shown


def ci(value: float, low: float, high: float) -> dict[str, float]:
    return {"value": value, "ci_low": low, "ci_high": high}


def group(accuracy, sensitivity=None, auc=None, unseen=False, images=40) -> dict:
    """One group's entry as compare writes it; PNEUMONIA absent from the sensitivities when ``sensitivity`` is None."""
    sensitivities = {"COVID19": ci(0.99, 0.97, 1.0)} | ({"PNEUMONIA": sensitivity} if sensitivity else {})
    return {"images": images, "accuracy": accuracy, "sensitivity": sensitivities,
            "roc_auc": {name: None for name in CLASSES}, "pneumonia_vs_normal_auc": auc, "unseen": unseen}


def subgroups(groups: dict, model: str = "custom") -> str:
    return json.dumps({model: {"groups": groups, "worst_group": min(groups)}})


class Files:
    """A fake ``git show``: files per revision, and the revisions it was asked for."""

    def __init__(self, by_rev: dict[str, str]) -> None:
        self.by_rev, self.read = by_rev, []

    def __call__(self, revision: str, path: str) -> str | None:
        self.read.append(revision)
        return self.by_rev.get(revision) if path == "metrics/subgroups.json" else None


SEEN_A = group(ci(0.90, 0.85, 0.94), ci(0.88, 0.80, 0.95), ci(0.96, 0.93, 0.98))
SEEN_B = group(ci(0.80, 0.70, 0.88), images=25)  # no pneumonia films: no sensitivity, no P vs N AUC
FILES = {
    rev("loo-all"): subgroups({A: SEEN_A, B: SEEN_B}),
    rev("rimed-gore"): subgroups({A: group(ci(0.70, 0.60, 0.80), ci(0.60, 0.45, 0.74), ci(0.85, 0.78, 0.91), unseen=True),
                                  B: group(ci(0.82, 0.72, 0.90), images=25)}),
    rev("zinky-view"): subgroups({A: group(ci(0.86, 0.80, 0.91), ci(0.84, 0.75, 0.92), ci(0.94, 0.90, 0.97)),
                                  B: group(ci(0.75, 0.64, 0.84), unseen=True, images=25)}),
}


def test_each_held_out_collection_is_compared_with_the_all_seen_run(loo):
    files = Files(FILES)
    rows = loo.leave_one_out(SHOWN, files)

    assert [(r["collection"], r["unseen_run"], r["seen_run"], r["images"]) for r in rows] == [
        (A, "rimed-gore", "loo-all", 40), (B, "zinky-view", "loo-all", 25)]
    assert rows[0]["drop"] == pytest.approx({"accuracy": 0.20, "pneumonia_sensitivity": 0.28, "pneumonia_vs_normal_auc": 0.11})
    assert rows[0]["unseen"]["accuracy"] == ci(0.70, 0.60, 0.80) and rows[0]["seen"]["accuracy"] == ci(0.90, 0.85, 0.94)
    assert rows[1]["drop"]["accuracy"] == pytest.approx(0.05)
    assert rows[1]["drop"]["pneumonia_sensitivity"] is None and rows[1]["drop"]["pneumonia_vs_normal_auc"] is None
    # the baseline (groups off), the queued stash, the failed run and `direct` (epochs 3, no partner) are never read
    assert set(files.read) == {rev("loo-all"), rev("rimed-gore"), rev("zinky-view")}


def test_without_an_all_seen_run_the_seen_score_comes_from_the_run_holding_out_the_other(loo):
    rows = loo.leave_one_out(without("loo-all"), Files(FILES))

    assert [(r["collection"], r["unseen_run"], r["seen_run"]) for r in rows] == [(A, "rimed-gore", "zinky-view"),
                                                                                  (B, "zinky-view", "rimed-gore")]
    assert rows[0]["drop"] == pytest.approx({"accuracy": 0.16, "pneumonia_sensitivity": 0.24, "pneumonia_vs_normal_auc": 0.09})
    assert rows[1]["drop"]["accuracy"] == pytest.approx(0.07)


def test_a_baseline_with_the_sweeps_params_but_no_report_yields_to_its_queued_twin(loo):
    """A user who set the sweep's params in params.yaml and queued ``loo-all`` without reproducing the commit."""
    shown = copy.deepcopy(SHOWN)
    twin = next(e for e in shown[1]["experiments"] if e["name"] == "loo-all")["revs"][0]
    shown[1]["data"]["params"] = copy.deepcopy(twin["data"]["params"])

    rows = loo.leave_one_out(shown, Files(FILES))
    assert [(r["collection"], r["seen_run"]) for r in rows] == [(A, "loo-all"), (B, "loo-all")]


def test_a_held_out_collection_without_test_images_is_left_out(loo, caplog):
    files = FILES | {rev("rimed-gore"): subgroups({B: group(ci(0.82, 0.72, 0.90), images=25)}),
                     rev("zinky-view"): subgroups({B: group(ci(0.75, 0.64, 0.84), unseen=True, images=25)}),
                     rev("loo-all"): subgroups({B: SEEN_B})}

    rows = loo.leave_one_out(SHOWN, Files(files))

    assert [(r["collection"], r["unseen_run"]) for r in rows] == [(B, "zinky-view")]
    assert "org/coll-a, held out in rimed-gore" in caplog.text and "no test images" in caplog.text


def test_the_model_and_the_collections_can_be_chosen(loo):
    ensemble = {"loo-all": {A: group(ci(0.95, 0.90, 0.98)), B: SEEN_B},
                "rimed-gore": {A: group(ci(0.65, 0.55, 0.75), unseen=True), B: SEEN_B},
                "zinky-view": {A: SEEN_A, B: group(ci(0.70, 0.60, 0.80), unseen=True, images=25)}}
    files = {rev(name): json.dumps(json.loads(FILES[rev(name)]) | json.loads(subgroups(groups, "ensemble")))
             for name, groups in ensemble.items()}

    rows = loo.leave_one_out(SHOWN, Files(files), model="ensemble", collections=[A])

    assert [(r["collection"], r["unseen_run"], r["seen_run"]) for r in rows] == [(A, "rimed-gore", "loo-all")]
    assert rows[0]["drop"]["accuracy"] == pytest.approx(0.30)


def test_the_table_shows_both_scores_with_intervals_and_the_drop(loo):
    text = loo.markdown(loo.leave_one_out(SHOWN, Files(FILES)), "custom")

    assert text.startswith("Leave-one-collection-out, Custom CNN")
    assert ("| org/coll-a | 40 | rimed-gore | loo-all | 0.700 [0.600, 0.800] | 0.900 [0.850, 0.940] | +0.200 | "
            "0.600 [0.450, 0.740] | 0.880 [0.800, 0.950] | +0.280 | "
            "0.850 [0.780, 0.910] | 0.960 [0.930, 0.980] | +0.110 |") in text
    assert ("| org/coll-b | 25 | zinky-view | loo-all | 0.750 [0.640, 0.840] | 0.800 [0.700, 0.880] | +0.050 | "
            "- | - | - | - | - | - |") in text


def real_report(unseen: list[str]) -> str:
    """compare's own subgroup report for 9 films of each collection: coll-b always right, coll-a wrong
    where it is held out (3 of 9: one NORMAL called PNEUMONIA, two PNEUMONIA called NORMAL and COVID19)."""
    truth = [name for name in CLASSES for _ in range(3)]
    wrong = {4: "PNEUMONIA", 7: "NORMAL", 8: "COVID19"} if A in unseen else {}
    paths, labels, predicted = [], [], []
    for collection in (A, B):
        for i, label in enumerate(truth):
            paths.append(f"test/{label}/{collection.replace('/', '_')}_{i}.jpg")
            labels.append(label)
            predicted.append(wrong.get(i, label) if collection == A else label)
    probabilities = pd.DataFrame(np.eye(3)[[CLASSES.index(p) for p in predicted]], columns=[f"prob_{c}" for c in CLASSES])
    frame = pd.DataFrame({"path": paths, "label": labels, "predicted": predicted}).join(probabilities)
    groups = pd.Series([p.split("/")[2].rsplit("_", 1)[0].replace("_", "/") for p in paths], index=paths)
    return json.dumps(subgroup_report({"custom": frame}, groups, list(CLASSES), 20, 0, unseen=unseen))


def test_the_real_subgroup_report_is_read_as_compare_writes_it(loo):
    files = {rev("loo-all"): real_report([]), rev("rimed-gore"): real_report([A]), rev("zinky-view"): real_report([B])}

    row = loo.leave_one_out(SHOWN, Files(files), collections=[A])[0]

    assert row["images"] == 9 and row["seen"]["accuracy"]["value"] == 1.0
    assert row["unseen"]["accuracy"]["value"] == pytest.approx(6 / 9)
    assert row["drop"]["pneumonia_sensitivity"] == pytest.approx(1 - 1 / 3)
    # pair scores P/(P+N): NORMAL films 0, 0, 1; PNEUMONIA films 1, 0, 0.5 (COVID19 call: 0/0 -> 0.5);
    # pairs where the pneumonia film ranks higher, ties half: 2.5 + 1 + 2 of 9
    assert row["unseen"]["pneumonia_vs_normal_auc"]["value"] == pytest.approx(5.5 / 9)
    assert row["drop"]["pneumonia_vs_normal_auc"] == pytest.approx(1 - 5.5 / 9)


@pytest.mark.parametrize(("shown", "files", "options", "message"), [
    (without("loo-all", "rimed-gore", "zinky-view", "direct"), FILES, {},
     "dvc exp show lists no finished experiment"),
    (SHOWN, FILES, {"collections": ["org/coll-c"]}, "collection 'org/coll-c': no finished experiment holds it out"),
    (without("loo-all", "rimed-gore"), FILES, {},
     "no collection has an unseen and a seen run to compare: org/coll-b: no finished run with the params of zinky-view"),
    (SHOWN, {k: v for k, v in FILES.items() if k != rev("rimed-gore")}, {},
     r"experiment rimed-gore \([0-9a-f]{7}\) has no metrics/subgroups.json"),
    (SHOWN, FILES | {rev("loo-all"): "{"}, {}, r"experiment loo-all \([0-9a-f]{7}\): metrics/subgroups.json is not JSON"),
    (SHOWN, FILES, {"model": "finetune"}, r"has no model 'finetune' \(it has \['custom'\]\)"),
    (SHOWN, FILES | {rev("loo-all"): subgroups({A: group(ci(0.9, 0.8, 1.0), images=39), B: SEEN_B})}, {},
     "'org/coll-a' has 40 test images in rimed-gore .* but 39 in loo-all"),
    (SHOWN, FILES | {rev("loo-all"): subgroups({A: SEEN_A | {"unseen": True}, B: SEEN_B})}, {},
     "loo-all .* marks 'org/coll-a' as unseen, its params say otherwise"),
    (SHOWN, FILES | {rev("loo-all"): subgroups({B: SEEN_B})}, {}, "loo-all .* has no test images of 'org/coll-a'"),
    (SHOWN, FILES | {rev("rimed-gore"): subgroups({B: SEEN_B})}, {"collections": [A]},
     r"collection 'org/coll-a': no test images in rimed-gore \("),
    (SHOWN, FILES | {rev("loo-all"): subgroups({A: {"images": 40, "accuracy": ci(0.9, 0.8, 1.0), "unseen": False}, B: SEEN_B})},
     {}, "loo-all .* has no 'sensitivity' for 'org/coll-a'; an older compare wrote it"),
])
def test_bad_sweeps_are_one_line(loo, shown, files, options, message):
    with pytest.raises(PipelineError, match=message) as raised:
        loo.leave_one_out(shown, Files(files), **options)
    assert "\n" not in str(raised.value)


def test_main_writes_the_rows_and_prints_the_table(loo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loo, "exp_show", lambda project: SHOWN)
    monkeypatch.setattr(loo, "git_reader", lambda project: Files(FILES))
    out = tmp_path / "loo.json"

    rows = loo.main(["--out", str(out)])

    assert json.loads(out.read_text()) == {"model": "custom", "rows": rows}
    assert "| org/coll-a | 40 | rimed-gore | loo-all |" in capsys.readouterr().out


def test_git_reader_reads_a_file_at_a_revision_and_none_where_it_is_missing(loo, tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "subgroups.json").write_text("{}\n")
    git("add", "metrics")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    read = loo.git_reader(tmp_path)

    assert read(git("rev-parse", "HEAD"), "metrics/subgroups.json") == "{}\n"
    assert read(git("rev-parse", "HEAD"), "metrics/other.json") is None
    assert read("0" * 40, "metrics/subgroups.json") is None


def test_exp_show_outside_a_dvc_project_is_one_line(loo, tmp_path):
    with pytest.raises(PipelineError, match="dvc exp show failed") as raised:
        loo.exp_show(tmp_path)
    assert "\n" not in str(raised.value)
