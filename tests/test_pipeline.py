"""End to end: ``dvc repro`` in a temporary copy of the project, on generated and (when present) real images."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cxr.files import read_json
from cxr.params import APPROACHES, CLASSES
from cxr.reporting.scores import classification_metrics

from conftest import make_kaggle_tree

ROOT = Path(__file__).resolve().parents[1]
MINI_ZIP = ROOT.parent / "shared" / "data" / "cxr3-mini.zip"
MODELS = (*APPROACHES, "ensemble")
PROJECT_FILES = ("stages", "src", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".gitignore", ".dvcignore")

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.com"
    return env


def sh(project: Path, *args: str) -> str:
    """Run a command in the project copy; fail the test with its output if it fails."""
    done = subprocess.run(args, cwd=project, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def make_project(tmp_path: Path, source: Path, image_size: int, epochs: int) -> Path:
    """Copy the project's pipeline files into a fresh git repo with tiny params."""
    project = tmp_path / "project"
    for name in PROJECT_FILES:
        target = project / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, target)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = str(source)
    params["split"]["val_fraction"] = 0.25
    params["preprocess"].update(image_size=image_size, workers=1)
    params["train"]["threads"] = 1
    for approach in APPROACHES:
        section = params[f"train_{approach}"]
        section.update(epochs=epochs, batch_size=16)
        if approach != "custom":
            section["weights"] = "none"
    params["train_custom"]["width"] = 8
    params["shortcuts"]["probe_epochs"] = epochs
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(project, "git", "init", "-q")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "tiny pipeline")
    return project


def copy_project(project: Path, destination: Path) -> Path:
    """A copy of a reproduced project (its git history, DVC cache and run-cache included) to change freely.

    The copy leaves DVC's state database (``.dvc/tmp``) behind: it is keyed by inode, so DVC would
    not trust it in the copy anyway and hashes the copied files once.
    """
    def dvc_state(folder: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(folder) == project / ".dvc" else []

    shutil.copytree(project, destination, symlinks=True, ignore=dvc_state)
    return destination


def ran_stages(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


def check_outputs(project: Path) -> None:
    """Every declared output exists and the table agrees with metrics recomputed from predictions."""
    for path in ("data/raw/train", "data/split/val.csv", "data/audited/test.csv", "data/processed/test.npy",
                 "metrics/data.json", "reports/skipped_images.csv", "reports/duplicates.csv", "metrics/summary.md",
                 "metrics/summary.json", "reports/report.md", "metrics/shortcuts.json", "plots/shortcuts.png",
                 "plots/compare.png", "plots/roc_pr.png",
                 "plots/reliability.png", "plots/evaluate/ensemble/confusion.png"):
        assert (project / path).exists(), path
    for approach in APPROACHES:
        assert (project / "models" / f"{approach}.pt").is_file()
        assert (project / "dvclive" / approach / "plots" / "metrics" / "val" / "macro_f1.tsv").is_file()
        for figure in ("confusion.png", "gradcam.png"):
            assert (project / "plots" / "evaluate" / approach / figure).is_file()
        assert (project / "reports" / "misclassified" / f"{approach}.csv").is_file()
    for model in MODELS:  # the CSVs behind the top-level roc_*, pr_* and calibration plots of dvc.yaml
        curves = [(f"plots/curves/calibration/{model}.csv", ["model", "confidence", "accuracy", "count"])]
        for name in CLASSES:
            curves += [(f"plots/curves/roc/{name}/{model}.csv", ["model", "class", "fpr", "tpr"]),
                       (f"plots/curves/pr/{name}/{model}.csv", ["model", "class", "recall", "precision"])]
        for path, columns in curves:
            table = pd.read_csv(project / path)
            assert list(table.columns) == columns and len(table) > 0, path
            assert set(table["model"]) == {model}, path
    declared = [spec for entry in yaml.safe_load((project / "dvc.yaml").read_text())["plots"] if isinstance(entry, dict)
                for spec in entry.values() if isinstance(spec, dict) and isinstance(spec.get("y"), dict)]
    curve_files = [path for spec in declared for path in spec["y"] if path.startswith("plots/curves/")]
    assert len(curve_files) == 7 * len(MODELS) and all((project / path).is_file() for path in curve_files)
    summary = pd.read_csv(project / "metrics" / "summary.csv")
    assert len(summary) == len(MODELS)
    for row, model in zip(summary.itertuples(index=False), MODELS):
        predictions = pd.read_csv(project / "metrics" / "predictions" / f"{model}.csv")
        recomputed = classification_metrics(predictions["label"], predictions["predicted"], CLASSES)
        assert read_json(project / "metrics" / f"{model}.json") == recomputed
        assert row[1:] == pytest.approx(
            (recomputed["accuracy"], recomputed["precision_macro"], recomputed["recall_macro"], recomputed["f1_macro"]),
            abs=1e-6,
        )


def test_dvc_repro_builds_everything_reproducibly_then_reruns_only_what_changed(reproduced_mini, tmp_path):
    """The first run is the session's shared one (conftest's ``reproduced_mini``); the rest happens in a copy."""
    first = reproduced_mini.log
    assert ran_stages(first) == {
        "download", "split", "audit", "preprocess", "train@custom", "train@extract", "train@finetune",
        "evaluate@custom", "evaluate@extract", "evaluate@finetune", "train_probe", "shortcuts", "external", "compare",
    }
    assert "F1-Score (Macro)" in first
    project = copy_project(reproduced_mini.project, tmp_path / "project")
    check_outputs(project)

    assert ran_stages(sh(project, "dvc", "repro")) == set()
    assert "up to date" in sh(project, "dvc", "status")

    metrics = {path.name: path.read_bytes() for path in (project / "metrics").glob("*.json")}
    forced = sh(project, "dvc", "repro", "--force", "--no-run-cache")
    assert "train@custom" in ran_stages(forced)
    assert {path.name: path.read_bytes() for path in (project / "metrics").glob("*.json")} == metrics
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "first run")

    rerun = sh(project, "dvc", "exp", "run", "-S", "train_custom.epochs=2")
    # compare reruns only if the custom model's scores changed; external rescores the new model; nothing else may rerun.
    assert {"train@custom", "evaluate@custom", "train_probe"} <= ran_stages(rerun) <= {
        "train@custom", "evaluate@custom", "train_probe", "shortcuts", "external", "compare"}
    check_outputs(project)
    assert "metrics/headline.json" in sh(project, "dvc", "metrics", "diff", "--all")
    sh(project, "dvc", "plots", "show", "-o", str(tmp_path / "plots_html"))
    assert (tmp_path / "plots_html" / "index.html").is_file()


def test_bad_param_stops_the_stage_with_one_line(tmp_path):
    source = make_kaggle_tree(tmp_path / "images", per_class=8, size=40).parent
    project = make_project(tmp_path, source, image_size=32, epochs=1)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_custom"]["optimiser"] = "adamw"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run([sys.executable, "stages/split.py"], cwd=project, env=_env(), capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: params.yaml: unknown key train_custom.optimiser; allowed keys in train_custom: "
        "epochs, batch_size, optimizer, lr, weight_decay, scheduler, patience, label_smoothing, weights, width, "
        "dropout, cache_embeddings, ema_decay, augment, border, lung_box, balance, select"
    ]


@pytest.mark.skipif(not MINI_ZIP.is_file(), reason="../shared/data/cxr3-mini.zip not present")
def test_dvc_repro_on_real_mini_images(tmp_path):
    project = make_project(tmp_path, MINI_ZIP, image_size=64, epochs=2)
    sh(project, "dvc", "repro")
    check_outputs(project)
    assert ran_stages(sh(project, "dvc", "repro")) == set()
    counts = read_json(project / "metrics" / "data.json")["processed"]
    assert sum(counts[split]["total"] for split in ("train", "val")) == 72 and counts["test"]["total"] == 24


MINI_MANIFEST = MINI_ZIP.parent / "cxr3-mini" / "manifest.csv"
NIH = "muhammedtalo/COVID-19"


@pytest.mark.skipif(not MINI_MANIFEST.is_file(), reason="../shared/data/cxr3-mini/manifest.csv not present")
def test_worst_group_options_run_through_dvc_repro_on_real_mini_images(tmp_path):
    """Issue 29's options on real collections: the mini's manifest as groups, the NIH collection kept unseen, and
    the custom CNN trained with ``balance: group``, ``select: worst_group`` and ``border: crop``."""
    project = make_project(tmp_path, MINI_ZIP, image_size=64, epochs=2)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["groups"].update(csv=str(MINI_MANIFEST), min_images=2)
    params["split"]["unseen_groups"] = [NIH]
    params["train_custom"].update(balance="group", select="worst_group", border="crop")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(project, "git", "commit", "-qam", "worst-group recipe")
    log = sh(project, "dvc", "repro")
    assert {"split", "train@custom", "compare"} <= ran_stages(log)
    check_outputs(project)

    manifest = pd.read_csv(MINI_MANIFEST)
    nih = manifest[manifest["source_repo"] == NIH]
    nih_train = int((nih["split"] == "train").sum())
    assert read_json(project / "reports" / "split.json")["unseen_groups"] == {
        NIH: {"removed_from_train_val": nih_train, "test_images": int((nih["split"] == "test").sum())}}
    counts = read_json(project / "metrics" / "data.json")["processed"]
    assert sum(counts[split]["total"] for split in ("train", "val")) == 72 - nih_train

    assert torch.load(project / "models" / "custom.pt", weights_only=True)["model_args"]["crop"] is True
    curve = pd.read_csv(project / "dvclive" / "custom" / "plots" / "metrics" / "val" / "worst_group_acc.tsv", sep="\t")
    summary = read_json(project / "dvclive" / "custom" / "metrics.json")
    assert summary["best_val_worst_group_acc"] == pytest.approx(curve["worst_group_acc"].max(), abs=1e-6)

    report = read_json(project / "metrics" / "subgroups.json")["custom"]["groups"]
    assert {group for group, entry in report.items() if entry["unseen"]} == {NIH}
    predictions = pd.read_csv(project / "metrics" / "predictions" / "custom.csv")
    in_nih = ("Data/" + predictions["path"]).isin(nih["file"]) | predictions["path"].isin(nih["file"])
    right = (predictions["label"] == predictions["predicted"])[in_nih]
    assert report[NIH]["accuracy"]["value"] == pytest.approx(right.mean())
