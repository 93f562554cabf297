"""Precision settings that must hold on every device: fp16 steps through a loss scaler, deterministic runs repeat.

No GPU is needed: a ``torch.amp.GradScaler`` works the same on the CPU, and a scaler with a
power-of-two scale changes no fp32 arithmetic, so its steps can be compared bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from cxr.training import loop
from cxr.training.engine import iterate_batches, train_one_epoch

from conftest import write_processed

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def fit_once(scaler: torch.amp.GradScaler | None, transform=None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    images = torch.randint(0, 256, (24, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(24) % 3
    train_one_epoch(model, iterate_batches(images, labels, 8), 24, optimizer, None, nn.CrossEntropyLoss(), CPU,
                    progress=False, scaler=scaler, transform=transform)
    return model


def test_a_loss_scaler_leaves_exact_steps_unchanged():
    plain = fit_once(None)
    scaled = fit_once(torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), scaled.state_dict().values()))


def test_a_step_whose_scaled_gradients_overflow_is_skipped_and_the_scale_backs_off():
    torch.manual_seed(0)
    initial = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).state_dict()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    model = fit_once(scaler, transform=lambda x: x * float("inf"))  # every gradient is NaN, as after an fp16 overflow
    assert all(torch.equal(a, b) for a, b in zip(initial.values(), model.state_dict().values()))
    assert scaler.get_scale() == 2.0**13  # halved after each of the three skipped steps


def test_fp16_training_gets_a_scaler_and_bf16_or_fp32_none(monkeypatch):
    monkeypatch.setattr(loop, "amp_dtype", lambda device, amp: {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp))
    assert isinstance(loop.make_grad_scaler(CPU, "fp16"), torch.amp.GradScaler)
    assert loop.make_grad_scaler(CPU, "bf16") is None
    assert loop.make_grad_scaler(CPU, "none") is None


def test_fp16_on_a_cpu_runs_fp32_without_a_scaler():
    assert loop.make_grad_scaler(CPU, "fp16") is None


def test_the_scaler_state_is_part_of_the_resume_state():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    state = loop.TrainingState(model, optimizer, None, None, scaler, seed=0, device=CPU)
    saved = state.state_dict()
    restored = loop.TrainingState(model, optimizer, None, None, torch.amp.GradScaler("cpu"), seed=0, device=CPU)
    restored.load_state_dict(saved)
    assert restored.scaler.get_scale() == 64.0


@pytest.mark.slow
def test_deterministic_training_on_cpu_gives_identical_checkpoints(tmp_path):
    def train_in(folder: Path) -> dict:
        write_processed(folder / "data" / "processed", {"train": 24, "val": 8})
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["train"].update(threads=1, deterministic=True)
        params["train_custom"].update(epochs=2, batch_size=8, width=8)
        (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        done = subprocess.run([sys.executable, str(ROOT / "stages" / "train.py"), "custom"], cwd=folder,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return torch.load(folder / "models" / "custom.pt", weights_only=True)

    first, second = train_in(tmp_path / "a"), train_in(tmp_path / "b")
    assert first["model"].keys() == second["model"].keys()
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    assert first["val_macro_f1"] == second["val_macro_f1"] and first["epoch"] == second["epoch"]
