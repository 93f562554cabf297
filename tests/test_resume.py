"""A training stage killed at any point resumes under `dvc repro` / `dvc exp run` and ends as if never stopped.

The kills happen the way they do to users: the training process dies under DVC, which then
fails the stage and deletes its non-persistent outputs before the next run. The reference is an
uninterrupted run of the same project; the resumed run must end with equal checkpoint tensors,
the same best epoch and scores, and the same learning curves.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from cxr.training.loop import train_approach

from conftest import make_kaggle_tree, write_processed
from test_pipeline import _env, make_project, ran_stages, sh
from test_train import tiny_params

EPOCHS = 8  # the custom CNN's best validation epoch on this data is 6: kills before and after it are both possible


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny pipeline whose custom CNN peaks mid-run, with an uninterrupted reference run of both trainings."""
    tmp = tmp_path_factory.mktemp("resume")
    source = make_kaggle_tree(tmp / "images", per_class=40, size=48).parent
    project = make_project(tmp, source, image_size=48, epochs=EPOCHS)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_custom"]["ema_decay"] = 0.9
    params["train_extract"]["epochs"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(project, "dvc", "repro", "train@custom", "train@extract")
    reference = {approach: outcome(project, approach) for approach in ("custom", "extract")}
    return project, reference


def outcome(project: Path, approach: str) -> dict:
    """What an uninterrupted run and a resumed one must share: checkpoint and learning curves."""
    curves = project / "dvclive" / approach
    return {
        "checkpoint": torch.load(project / "models" / f"{approach}.pt", weights_only=True),
        "curves": {str(p.relative_to(curves)): p.read_text() for p in sorted(curves.rglob("*")) if p.is_file()},
    }


def assert_same_outcome(actual: dict, expected: dict) -> None:
    got, want = actual["checkpoint"], expected["checkpoint"]
    assert got.keys() == want.keys()
    assert {k: v for k, v in got.items() if k != "model"} == {k: v for k, v in want.items() if k != "model"}
    assert got["model"].keys() == want["model"].keys()
    assert all(torch.equal(got["model"][name], want["model"][name]) for name in want["model"])
    assert actual["curves"] == expected["curves"]


def resume_state(project: Path, approach: str) -> dict | None:
    path = project / "models" / f"{approach}.resume.pt"
    return torch.load(path, weights_only=True) if path.is_file() else None


def kill_training(dvc: subprocess.Popen) -> None:
    """SIGKILL the training process DVC started (DVC itself then fails the stage, as after a crash)."""
    for child in psutil.Process(dvc.pid).children(recursive=True):
        if "stages/train.py" in " ".join(child.cmdline()):
            child.kill()


def run_and_kill_after(project: Path, command: list[str], approach: str, epoch: int) -> int:
    """Start ``command``; kill training once its resume state holds ``epoch`` epochs; return the epochs it holds."""
    dvc = subprocess.Popen(command, cwd=project, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while True:
        assert dvc.poll() is None, f"training ended before the kill:\n{dvc.stdout.read()[-3000:]}"
        try:
            state = resume_state(project, approach)
        except (RuntimeError, EOFError, OSError):  # the file is being replaced
            state = None
        if state is not None and not state["finished"] and state["epoch"] >= epoch:
            break
        time.sleep(0.01)
    kill_training(dvc)
    assert dvc.wait(timeout=120) != 0
    state = resume_state(project, approach)
    assert not state["finished"]
    return state["epoch"]


@pytest.mark.slow
def test_killed_after_the_best_epoch_dvc_repro_resumes_and_writes_the_best_checkpoint(project):
    project, reference = project
    best = reference["custom"]["checkpoint"]["epoch"]
    assert 1 < best < EPOCHS, "the data no longer peak mid-run: pick another seed or size"
    killed_at = run_and_kill_after(project, ["dvc", "repro", "-f", "-s", "train@custom"], "custom", best)
    assert best <= killed_at < EPOCHS
    assert not (project / "models" / "custom.pt").exists()  # DVC removed it; only the resume state has the best

    resumed = sh(project, "dvc", "repro", "train@custom")
    assert f"resuming after epoch {killed_at}" in resumed
    assert ran_stages(resumed) == {"train@custom"}
    assert_same_outcome(outcome(project, "custom"), reference["custom"])
    assert resume_state(project, "custom")["finished"]
    assert not [p for p in (project / "models").iterdir() if ".tmp" in p.name]
    assert ran_stages(sh(project, "dvc", "repro", "train@custom")) == set()


@pytest.mark.slow
def test_killed_before_the_best_epoch_dvc_exp_run_resumes_to_the_same_checkpoint(project):
    project, reference = project
    best = reference["custom"]["checkpoint"]["epoch"]
    killed_at = run_and_kill_after(project, ["dvc", "exp", "run", "-f", "train@custom"], "custom", 1)
    assert 1 <= killed_at < best

    resumed = sh(project, "dvc", "exp", "run", "train@custom")
    assert f"resuming after epoch {killed_at}" in resumed
    assert_same_outcome(outcome(project, "custom"), reference["custom"])
    assert not [p for p in (project / "models").iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_killed_while_caching_embeddings_the_extract_stage_reruns_to_the_same_checkpoint(project):
    project, reference = project
    before = (project / "models" / "extract.resume.pt").read_bytes()
    dvc = subprocess.Popen(["dvc", "repro", "-f", "-s", "train@extract"], cwd=project, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in dvc.stdout:
        if "caching the frozen body's embeddings" in line:
            kill_training(dvc)
            break
    assert dvc.wait(timeout=120) != 0
    assert (project / "models" / "extract.resume.pt").read_bytes() == before, "the kill came after an epoch ended"

    rerun = sh(project, "dvc", "repro", "train@extract")
    assert "resuming" not in rerun and ran_stages(rerun) == {"train@extract"}
    assert_same_outcome(outcome(project, "extract"), reference["extract"])


def fresh_and_resumed(tmp_path: Path, damage, caplog) -> tuple[dict, dict, list[str]]:
    """Train once without a resume file and once over a damaged one; return both checkpoints and the log."""
    processed = tmp_path / "processed"
    write_processed(processed, {"train": 8, "val": 4})
    params = tiny_params(train_custom={"epochs": 2})
    train_approach("custom", params, processed, tmp_path / "fresh.pt", tmp_path / "live-fresh", progress=False)
    resume = tmp_path / "custom.resume.pt"
    damage(resume, processed)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_approach("custom", params, processed, tmp_path / "again.pt", tmp_path / "live-again",
                       resume_path=resume, progress=False)
    fresh, again = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("fresh", "again"))
    return fresh, again, [r.getMessage() for r in caplog.records if "resume" in r.getMessage()]


def test_a_corrupt_resume_file_is_logged_in_one_line_and_training_starts_fresh(tmp_path, caplog):
    def corrupt(resume: Path, processed: Path) -> None:
        resume.write_bytes(b"PK\x03\x04 not a torch file")

    fresh, again, lines = fresh_and_resumed(tmp_path, corrupt, caplog)
    assert len(lines) == 1 and "unreadable" in lines[0] and "training from scratch" in lines[0]
    assert "\n" not in lines[0]
    assert all(torch.equal(again["model"][k], v) for k, v in fresh["model"].items())


def test_a_resume_file_from_other_params_is_logged_in_one_line_and_training_starts_fresh(tmp_path, caplog):
    def from_other_params(resume: Path, processed: Path) -> None:
        other = tiny_params(train_custom={"epochs": 2, "lr": 0.01})
        train_approach("custom", other, processed, resume.with_name("other.pt"), resume.with_name("live-other"),
                       resume_path=resume, progress=False)
        state = torch.load(resume, weights_only=True)
        state.update(finished=False, epoch=1)  # as if killed after its first epoch
        torch.save(state, resume)

    fresh, again, lines = fresh_and_resumed(tmp_path, from_other_params, caplog)
    assert len(lines) == 1 and "other params, data or code" in lines[0] and "training from scratch" in lines[0]
    assert all(torch.equal(again["model"][k], v) for k, v in fresh["model"].items())


def test_a_finished_run_is_not_resumed(tmp_path, caplog):
    def finished(resume: Path, processed: Path) -> None:
        params = tiny_params(train_custom={"epochs": 2})
        train_approach("custom", params, processed, resume.with_name("first.pt"), resume.with_name("live-first"),
                       resume_path=resume, progress=False)

    fresh, again, lines = fresh_and_resumed(tmp_path, finished, caplog)
    assert lines == [f"{tmp_path / 'custom.resume.pt'} belongs to a finished run: training from scratch"]
    assert all(torch.equal(again["model"][k], v) for k, v in fresh["model"].items())
