"""Training: checkpoints, learning-curve logs, embedding cache and reproducibility."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cxr.data.preprocess import load_split
from cxr.errors import PipelineError
from cxr.params import CLASSES, parse_params
from cxr.training import loop, runtime
from cxr.training.loop import SplitTensors, compute_embeddings, load_tensors, make_ema, train_approach
from cxr.training.models import build_model, load_checkpoint, model_from_checkpoint

from conftest import write_processed

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # matches conftest.write_processed


def tiny_params(**sections):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["train"]["threads"] = 1
    for name in ("train_custom", "train_extract", "train_finetune"):
        raw[name].update(epochs=2, batch_size=8)
        raw[name].setdefault("weights", "none")
        if name != "train_custom":
            raw[name]["weights"] = "none"
    raw["train_custom"]["width"] = 8
    for name, values in sections.items():
        raw[name].update(values)
    return parse_params(raw)


@pytest.fixture
def processed(tmp_path):
    folder = tmp_path / "processed"
    write_processed(folder, {"train": 8, "val": 4})
    return folder


def test_custom_training_writes_a_plain_checkpoint_and_learning_curves(processed, tmp_path):
    summary = train_approach("custom", tiny_params(), processed, tmp_path / "custom.pt", tmp_path / "live", progress=False)
    checkpoint = torch.load(tmp_path / "custom.pt", weights_only=True)
    assert checkpoint["approach"] == "custom" and checkpoint["classes"] == list(CLASSES)
    assert checkpoint["image_size"] == SIZE and checkpoint["epoch"] == summary["epoch"]
    model = model_from_checkpoint(checkpoint)
    assert model(torch.rand(1, 1, SIZE, SIZE)).shape == (1, 3)
    for split in ("train", "val"):
        for metric in ("loss", "accuracy", "macro_f1"):
            rows = (tmp_path / "live" / "plots" / "metrics" / split / f"{metric}.tsv").read_text().splitlines()
            assert len(rows) == 1 + summary["epochs_run"]
    assert json.loads((tmp_path / "live" / "metrics.json").read_text()) == {
        "best_epoch": summary["epoch"], "best_val_f1": round(summary["val_macro_f1"], 6), "step": summary["epochs_run"] - 1,
    }


def test_same_params_give_identical_weights(processed, tmp_path):
    for run in ("a", "b"):
        train_approach("custom", tiny_params(), processed, tmp_path / f"{run}.pt", tmp_path / run, progress=False)
    a, b = (torch.load(tmp_path / f"{run}.pt", weights_only=True)["model"] for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def assert_body_equals_a_fresh_build(checkpoint: dict, seed: int) -> None:
    """The saved body equals a freshly built, identically seeded model's; the head does not (it trained)."""
    torch.manual_seed(seed)
    fresh = build_model(**checkpoint["model_args"]).state_dict()
    saved = checkpoint["model"]
    body = [key for key in fresh if key.startswith("body.")]
    assert body and saved.keys() == fresh.keys()
    assert all(torch.equal(saved[key], fresh[key]) for key in body)  # weights and BatchNorm statistics alike
    assert not torch.equal(saved["head.1.weight"], fresh["head.1.weight"])


def test_extract_caches_embeddings_and_keeps_the_body_unchanged(processed, tmp_path):
    params = tiny_params()
    summary = train_approach("extract", params, processed, tmp_path / "extract.pt", tmp_path / "live", progress=False)
    assert summary["cached_embeddings"] is True
    checkpoint = load_checkpoint(tmp_path / "extract.pt")
    assert_body_equals_a_fresh_build(checkpoint, params.train.seed)
    trained = model_from_checkpoint(checkpoint)
    split = load_tensors(processed, "val", list(CLASSES))
    cached = compute_embeddings(trained, split, 4, torch.device("cpu"), torch.contiguous_format)
    logits_from_cache = trained.head(cached.inputs)
    with torch.inference_mode():
        logits_full = trained(torch.from_numpy(np.array(split.inputs)).unsqueeze(1).float() / 255)
    assert torch.allclose(logits_from_cache, logits_full, atol=1e-5)


def test_the_moving_average_starts_at_the_model_and_ramps_its_decay_up_to_the_param():
    layer = torch.nn.Linear(2, 1)
    ema = make_ema(layer, 0.99)
    before = layer.weight.detach().clone()
    ema.update_parameters(layer)
    assert torch.equal(ema.module.weight, before)
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update_parameters(layer)  # second update: decay (1 + 1) / (10 + 1)
    torch.testing.assert_close(ema.module.weight, before + 9 / 11)
    ema.n_averaged.fill_(10**6)  # long run: the ramp has passed the param
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update_parameters(layer)
    torch.testing.assert_close(ema.module.weight, before + 9 / 11 + 0.01 * (2 - 9 / 11))
    assert make_ema(layer, 0.0) is None


@pytest.mark.parametrize("approach", ["custom", "extract"])
def test_the_moving_average_of_the_trained_part_is_validated_and_saved(processed, tmp_path, approach):
    section = {"custom": "train_custom", "extract": "train_extract"}[approach]
    params = tiny_params(**{section: {"epochs": 1, "ema_decay": 0.5}})
    resume = tmp_path / "resume.pt"
    train_approach(approach, params, processed, tmp_path / "m.pt", tmp_path / "live", resume_path=resume, progress=False)
    saved = torch.load(tmp_path / "m.pt", weights_only=True)["model"]
    state = torch.load(resume, weights_only=True)
    prefix = "" if approach == "custom" else "head."
    averaged = {prefix + k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    steps = -(-len(load_tensors(processed, "train", list(CLASSES))) // 8)
    assert int(state["ema"]["n_averaged"]) == steps  # one update per optimizer step
    assert averaged and all(torch.equal(saved[k], v) for k, v in averaged.items())
    assert saved.keys() == state["model"].keys()
    moved = [k for k in averaged if saved[k].is_floating_point() and not torch.equal(saved[k], state["model"][k])]
    assert moved, "the saved weights are the raw ones"
    untouched = set(saved) - set(averaged)
    assert all(torch.equal(saved[k], state["model"][k]) for k in untouched)
    assert (approach == "extract") == bool(untouched)


def test_cached_embeddings_keep_the_precision_the_body_ran_in(processed, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES), [0.5] * 3, [0.2] * 3).eval()
    split = load_tensors(processed, "val", list(CLASSES))
    cached = compute_embeddings(model, split, 4, torch.device("cpu"), torch.contiguous_format, amp="bf16")
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected = model.embed(torch.from_numpy(np.array(split.inputs)).unsqueeze(1).float() / 255)
    assert cached.inputs.dtype is torch.bfloat16
    torch.testing.assert_close(cached.inputs, expected)  # bf16 tolerance: batches of 4 vs one of all
    assert torch.equal(cached.labels, split.labels)


def test_extract_with_augmentation_runs_the_frozen_body_every_batch(processed, tmp_path, monkeypatch):
    calls: list[tuple[str, torch.Tensor]] = []

    def observed_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.body.register_forward_hook(lambda module, inputs, output: calls.append(("body", output)))
        model.head.register_forward_pre_hook(lambda module, inputs: calls.append(("head", inputs[0])))
        return model

    monkeypatch.setattr(loop, "build_model", observed_model)
    augment = {"enabled": True, "rotation_deg": 5.0, "scale": 0.05, "translate": 0.05, "brightness": 0.05, "contrast": 0.05}
    params = tiny_params(train_extract={"augment": augment, "epochs": 1})
    summary = train_approach("extract", params, processed, tmp_path / "e.pt", tmp_path / "live", progress=False)
    train_batches = -(-len(load_tensors(processed, "train", list(CLASSES))) // 8)
    val_batches = -(-len(load_tensors(processed, "val", list(CLASSES))) // params.evaluate.batch_size)
    # Every batch, train and val alike, runs the body and feeds its very output to the head: no cache in between.
    assert [name for name, _ in calls] == ["body", "head"] * (train_batches + val_batches)
    assert all(head_input is body_output for (_, body_output), (_, head_input) in zip(calls[::2], calls[1::2]))
    assert summary["cached_embeddings"] is False
    assert_body_equals_a_fresh_build(load_checkpoint(tmp_path / "e.pt"), params.train.seed)


def test_border_hide_is_saved_in_the_model(processed, tmp_path):
    train_approach("custom", tiny_params(train_custom={"border": "hide", "lung_box": 0.5}), processed,
                   tmp_path / "h.pt", tmp_path / "lh", progress=False)
    checkpoint = torch.load(tmp_path / "h.pt", weights_only=True)
    assert checkpoint["model_args"]["lung_box"] == 0.5 and checkpoint["recipe"]["border"] == "hide"
    assert model_from_checkpoint(checkpoint).norm.lung_box == 0.5


def test_training_from_the_memory_map_equals_training_from_memory(processed, tmp_path, monkeypatch):
    mapped = train_approach("custom", tiny_params(), processed, tmp_path / "mapped.pt", tmp_path / "l1", progress=False)

    def in_memory(folder, split, classes):
        images, labels, _ = load_split(folder, split, classes)
        assert isinstance(images, np.memmap)
        return SplitTensors(torch.from_numpy(np.array(images)), torch.from_numpy(labels))

    monkeypatch.setattr(loop, "load_tensors", in_memory)
    held = train_approach("custom", tiny_params(), processed, tmp_path / "held.pt", tmp_path / "l2", progress=False)
    assert mapped == held
    first, second = (torch.load(tmp_path / name, weights_only=True)["model"] for name in ("mapped.pt", "held.pt"))
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_splits_over_the_gpu_data_budget_stay_memory_mapped_and_say_so(processed, caplog):
    train, val = (load_tensors(processed, split, list(CLASSES)) for split in ("train", "val"))
    with caplog.at_level("INFO"):
        streamed, _ = loop._place_on_gpu("custom", train, val, torch.device("cpu"), budget_gb=0.0)
    assert streamed.inputs is train.inputs and "streaming batches from the memory-mapped splits" in caplog.text
    held, _ = loop._place_on_gpu("custom", train, val, torch.device("cpu"), budget_gb=1.0)
    assert isinstance(held.inputs, torch.Tensor) and torch.equal(held.inputs, torch.from_numpy(np.array(train.inputs)))


def test_finetune_trains_every_layer(processed, tmp_path):
    params = tiny_params(train_finetune={"epochs": 1})
    torch.manual_seed(params.train.seed)
    train_approach("finetune", params, processed, tmp_path / "f.pt", tmp_path / "live", progress=False)
    first = load_checkpoint(tmp_path / "f.pt")["model"]["body.conv1.weight"]
    params_frozen = tiny_params(train_extract={"epochs": 1})
    train_approach("extract", params_frozen, processed, tmp_path / "e.pt", tmp_path / "live2", progress=False)
    frozen = load_checkpoint(tmp_path / "e.pt")["model"]["body.conv1.weight"]
    # Both start from the same seeded initialisation; only fine-tuning moves the first convolution.
    assert not torch.equal(first, frozen)


def test_missing_preprocessed_data_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="run `dvc repro preprocess` first"):
        train_approach("custom", tiny_params(), tmp_path / "nothing", tmp_path / "m.pt", tmp_path / "live", progress=False)


def test_gpu_data_budget_changes_nothing_on_cpu(processed, tmp_path):
    """train.gpu_data_gb only decides, on CUDA, whether the splits move to the GPU; dvc.yaml does not track it."""
    weights = {}
    for budget in (0, 4):
        params = tiny_params(train={"gpu_data_gb": budget}, train_custom={"epochs": 1})
        train_approach("custom", params, processed, tmp_path / f"{budget}.pt", tmp_path / f"live{budget}", progress=False)
        weights[budget] = torch.load(tmp_path / f"{budget}.pt", weights_only=True)["model"]
    assert weights[0].keys() == weights[4].keys()
    assert all(torch.equal(weights[0][key], weights[4][key]) for key in weights[0])


_TRAIN_IN_A_FRESH_PROCESS = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_train import tiny_params
from cxr.training.loop import train_approach
params = tiny_params(train=json.loads(sys.argv[2]), train_custom={"epochs": 1})
train_approach("custom", params, Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), progress=False)
"""


@pytest.mark.slow
def test_reusing_freed_memory_changes_nothing(processed, tmp_path):
    """train.reuse_freed_memory changes glibc's allocator for the whole process (it cannot be undone), so each
    setting trains in a process of its own; the weights must match bit for bit, which is why dvc.yaml does not
    track the key."""
    weights = {}
    for reuse in (False, True):
        out = tmp_path / f"{reuse}.pt"
        subprocess.run([sys.executable, "-c", _TRAIN_IN_A_FRESH_PROCESS, str(ROOT / "tests"),
                        json.dumps({"reuse_freed_memory": reuse}), str(processed), str(out), str(tmp_path / f"live{reuse}")],
                       check=True, capture_output=True)
        weights[reuse] = torch.load(out, weights_only=True)["model"]
    assert weights[False].keys() == weights[True].keys()
    assert all(torch.equal(weights[False][key], weights[True][key]) for key in weights[False])
