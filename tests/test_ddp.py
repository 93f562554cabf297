"""The training stage under ``torchrun --nproc_per_node=2`` (gloo, CPU) against a single-process run, and on two "nodes".

The data-parallel run uses batch 8 per process, the single-process run batch 16: the same
effective batch and the same number of steps. Their batches still differ (DistributedSampler
order, BatchNorm statistics over 8 images instead of 16), so their final validation scores
agree within ``TOLERANCE``, not exactly. Scoring is exact, though: the DDP run's logged
validation metrics are those of one process evaluating the checkpoint it saved (in the
precision ``train.amp`` gives here).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from cxr.params import CLASSES
from cxr.training.engine import evaluate, iterate_batches
from cxr.training.loop import load_tensors
from cxr.training.models import load_checkpoint, model_from_checkpoint

from conftest import write_processed

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6
TOLERANCE = 0.1  # absolute, on final validation accuracy and macro-F1 (24 validation images: 0.1 is ~2 of them)
LOSS_ROUNDING = 1e-5  # the learning curves store 6 decimals; gathered shard losses add float rounding
OUTPUTS = {
    "models/custom.pt",
    "models/custom.resume.pt",
    "dvclive/custom/metrics.json",
    *(f"dvclive/custom/plots/metrics/{split}/{metric}.tsv"
      for split in ("train", "val") for metric in ("loss", "accuracy", "macro_f1")),
}


def make_project(folder: Path, batch_size: int) -> Path:
    write_processed(folder / "data" / "processed", {"train": 32, "val": 8})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["threads"] = 1
    params["train_custom"].update(epochs=EPOCHS, batch_size=batch_size, width=8, patience=0)
    params["train_custom"]["augment"]["enabled"] = False
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def run_stage(project: Path, processes: int) -> str:
    """Run the custom training stage (under torchrun when ``processes`` > 1); return its stderr."""
    script = str(ROOT / "stages" / "train.py")
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone"] if processes > 1 else []
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, *launcher, script, "custom"], cwd=project, env={**env, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process project, its stderr, two-process project, its stderr)."""
    single = make_project(tmp_path_factory.mktemp("single"), batch_size=16)
    ddp = make_project(tmp_path_factory.mktemp("ddp"), batch_size=8)
    return single, run_stage(single, 1), ddp, run_stage(ddp, 2)


def written_files(project: Path) -> set[str]:
    return {p.relative_to(project).as_posix() for p in project.rglob("*")
            if p.is_file() and p.parts[len(project.parts)] not in ("data", "params.yaml")}


@pytest.mark.slow
def test_ddp_run_completes_and_rank_0_alone_logs_and_writes(runs):
    single, single_log, ddp, ddp_log = runs
    assert "DistributedDataParallel over 2 processes (gloo), batch 8 per process = 16 per step" in ddp_log
    assert "DistributedDataParallel" not in single_log
    assert ddp_log.count(f"custom epoch {EPOCHS}/{EPOCHS}:") == 1 and ddp_log.count("best epoch") == 1
    assert written_files(ddp) == written_files(single) == OUTPUTS
    curve = (ddp / "dvclive/custom/plots/metrics/val/macro_f1.tsv").read_text().splitlines()
    assert len(curve) == 1 + EPOCHS
    checkpoint = torch.load(ddp / "models/custom.pt", weights_only=True)
    resume = torch.load(ddp / "models/custom.resume.pt", weights_only=True)
    reference = torch.load(single / "models/custom.pt", weights_only=True)
    assert set(checkpoint["model"]) == set(resume["model"]) == set(reference["model"])  # no "module." prefix
    assert resume["finished"] and resume["epoch"] == EPOCHS


@pytest.mark.slow
def test_ddp_validation_scores_match_a_single_process_run(runs):
    single, _, ddp, _ = runs
    expected, actual = (final_validation(folder) for folder in (single, ddp))
    assert actual["accuracy"] == pytest.approx(expected["accuracy"], abs=TOLERANCE)
    assert actual["macro_f1"] == pytest.approx(expected["macro_f1"], abs=TOLERANCE)


def final_validation(project: Path) -> dict[str, float]:
    """The last epoch's validation accuracy and macro-F1, from the learning curves DVCLive wrote."""
    curves = project / "dvclive/custom/plots/metrics/val"
    return {name: float((curves / f"{name}.tsv").read_text().splitlines()[-1].split("\t")[1])
            for name in ("accuracy", "macro_f1")}


@pytest.mark.slow
def test_ddp_logged_validation_equals_one_process_scoring_the_saved_weights(runs):
    _, _, ddp, _ = runs
    checkpoint = load_checkpoint(ddp / "models/custom.pt")
    model = model_from_checkpoint(checkpoint).to(memory_format=torch.channels_last)
    val = load_tensors(ddp / "data" / "processed", "val", list(CLASSES))
    scored = evaluate(model, iterate_batches(val.inputs, val.labels, 128), len(val), nn.CrossEntropyLoss(),
                      torch.device("cpu"), amp=yaml.safe_load((ddp / "params.yaml").read_text())["train"]["amp"],
                      memory_format=torch.channels_last, progress=False)
    assert len(scored.labels) == len(val)
    assert scored.accuracy == checkpoint["val_accuracy"] and scored.macro_f1 == checkpoint["val_macro_f1"]
    logged = (ddp / "dvclive/custom/plots/metrics/val/loss.tsv").read_text().splitlines()
    step, logged_loss = logged[checkpoint["epoch"]].split("\t")
    assert int(step) == checkpoint["epoch"] - 1
    assert float(logged_loss) == pytest.approx(scored.loss, abs=LOSS_ROUNDING)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_each_with_its_own_copy_of_the_memory_mapped_data_train_as_one_two_process_run(runs, tmp_path):
    """``torchrun --nnodes=2`` as the README describes it, both "nodes" on this machine, each in its own folder."""
    _, _, ddp, _ = runs
    nodes = [make_project(tmp_path / f"node{rank}", batch_size=8) for rank in (0, 1)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    env = {**{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
           "OMP_NUM_THREADS": "1"}
    started = [subprocess.Popen([*launcher, f"--node_rank={rank}", str(ROOT / "stages" / "train.py"), "custom"],
                                cwd=node, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for rank, node in enumerate(nodes)]
    logs = [process.communicate(timeout=300)[1] for process in started]
    assert [process.returncode for process in started] == [0, 0], logs
    assert "DistributedDataParallel over 2 processes (gloo)" in logs[0]
    assert written_files(nodes[0]) == OUTPUTS and written_files(nodes[1]) == set()  # only global rank 0 writes
    mapped = load_tensors(nodes[1] / "data" / "processed", "train", list(CLASSES)).inputs
    assert isinstance(mapped, np.memmap)
    together, apart = (torch.load(folder / "models/custom.pt", weights_only=True)["model"] for folder in (ddp, nodes[0]))
    assert all(torch.equal(together[key], apart[key]) for key in together)
