"""A training stage killed mid-run resumes from its last complete epoch and ends as if never stopped."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_processed

ROOT = Path(__file__).resolve().parents[1]


def make_project(folder: Path, epochs: int) -> Path:
    write_processed(folder / "data" / "processed", {"train": 48, "val": 8})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["threads"] = 1
    params["train_custom"].update(epochs=epochs, batch_size=8, width=8, patience=0, ema_decay=0.9)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def start_training(project: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / "train.py"), "custom"],
        cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def learning_curves(project: Path) -> dict[str, str]:
    folder = project / "plots" / "custom" / "plots" / "metrics"
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*.tsv"))}


@pytest.mark.slow
def test_killed_training_resumes_and_matches_an_uninterrupted_run(tmp_path):
    epochs = 3
    reference = make_project(tmp_path / "reference", epochs)
    assert start_training(reference).wait(timeout=600) == 0

    project = make_project(tmp_path / "killed", epochs)
    resume_file = project / "models" / "custom.resume.pt"
    process = start_training(project)
    while not resume_file.exists():
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    state = torch.load(resume_file, weights_only=True)
    assert not state["finished"] and 1 <= state["epoch"] < epochs
    assert not [p for p in (project / "models").iterdir() if ".tmp" in p.name]

    resumed = start_training(project)
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert "resuming after epoch" in stderr

    expected = torch.load(reference / "models" / "custom.pt", weights_only=True)
    actual = torch.load(project / "models" / "custom.pt", weights_only=True)
    assert actual["epoch"] == expected["epoch"] and actual["val_macro_f1"] == expected["val_macro_f1"]
    assert all(torch.equal(actual["model"][k], expected["model"][k]) for k in expected["model"])
    assert learning_curves(project) == learning_curves(reference)
    assert torch.load(resume_file, weights_only=True)["finished"]


def test_a_finished_or_different_run_is_not_resumed(tmp_path):
    project = make_project(tmp_path / "p", 1)
    assert start_training(project).wait(timeout=600) == 0
    again = start_training(project)
    _, stderr = again.communicate(timeout=600)
    assert again.returncode == 0 and "resuming" not in stderr
