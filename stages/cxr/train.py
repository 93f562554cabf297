"""Fit one approach (custom CNN, feature extraction or fine-tuning) and keep its best epoch.

One module serves the three training stages; they differ only by their params section.
With a frozen body and no augmentation, feature extraction computes the body's embeddings
once per split and trains the head on them: the result is the same model as running the
frozen body every epoch, many times faster.

Launched with ``torchrun --nproc_per_node=N stages/train.py <approach>``, the same code trains
data-parallel (DistributedDataParallel, see :mod:`cxr.distributed`); launched with python it
is the single-process run, unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dvclive import Live
from torch import nn
from torch.optim.swa_utils import AveragedModel

from cxr import distributed
from cxr.augment import augment_batch
from cxr.engine import (
    EpochResult, batches_in_order, combine_results, evaluate, iterate_batches, to_input, train_one_epoch,
)
from cxr.errors import PipelineError
from cxr.files import atomic_write
from cxr.models import IMAGENET_MEAN, IMAGENET_STD, Classifier, backbone_weights, build_model, imagenet_state_dict
from cxr.params import Params, TrainParams, as_dict
from cxr.preprocess import load_split
from cxr.runtime import autocast, configure, describe_precision, memory_format_of

log = logging.getLogger(__name__)
ARCH_BY_APPROACH = {"custom": "custom_cnn", "extract": "resnet18", "finetune": "resnet18"}


@dataclass
class SplitTensors:
    """A split held in memory: uint8 images (N x H x W) or float embeddings (N x D), int64 labels."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> SplitTensors:
        return SplitTensors(self.inputs.to(device), self.labels.to(device))


def load_tensors(processed_dir: Path, split: str, classes: list[str]) -> SplitTensors:
    images, labels, _ = load_split(processed_dir, split, classes)
    return SplitTensors(torch.from_numpy(images), torch.from_numpy(labels))


def pixel_stats(images: torch.Tensor, chunk: int = 512) -> tuple[float, float]:
    """Mean and standard deviation of all pixels in [0, 1], computed in float64 chunks."""
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].double().div(255)
        total, total_sq, count = total + block.sum().item(), total_sq + block.square().sum().item(), count + block.numel()
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean**2, 1e-12))


def model_args_for(approach: str, recipe: TrainParams, train_images: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """The primitive arguments that rebuild the architecture (stored in the checkpoint)."""
    arch = ARCH_BY_APPROACH[approach]
    channels = 1 if arch == "custom_cnn" else 3
    if arch == "resnet18" and recipe.weights != "none":
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    else:
        pixel_mean, pixel_std = pixel_stats(train_images)
        mean, std = [pixel_mean] * channels, [pixel_std] * channels
    return {
        "arch": arch,
        "num_classes": num_classes,
        "mean": mean,
        "std": std,
        "width": recipe.width,
        "dropout": recipe.dropout,
    }


def make_optimizer(recipe: TrainParams, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)


def make_scheduler(
    recipe: TrainParams, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-batch learning-rate schedule over the whole planned run."""
    total = recipe.epochs * steps_per_epoch
    if recipe.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total, pct_start=0.2)
    if recipe.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


def make_ema(module: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``module``'s weights and BatchNorm statistics; None when ``decay`` is 0.

    Validation scores of the raw weights jump from one epoch to the next (custom CNN on cxr3:
    up to 5 points mid-run, about 1 near the end of one-cycle); the average over the last
    ~1 / (1 - decay) steps is smoother and usually better, so it is what is validated and
    saved (as in the torchvision and timm reference scripts). Training itself continues from
    the raw weights. The decay ramps up as (1 + n) / (10 + n) after n updates (TensorFlow's
    ``num_updates``): a plain average would hold on to the random initialisation for
    thousands of steps, and early stopping would judge that blend instead of the model.
    """
    if not decay:
        return None

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # BatchNorm's batch counters: nothing to average
            torch._foreach_copy_(averaged, current)
            return
        n = int(updates)
        step_decay = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(averaged, current, 1 - step_decay)

    return AveragedModel(module, multi_avg_fn=update, use_buffers=True)


def saved_weights(model: Classifier, ema: AveragedModel | None = None, head_only: bool = False,
                  ) -> dict[str, torch.Tensor]:
    """The model's weights on the CPU, with the averaged ones for the part that was trained (the head, or all)."""
    state = model.state_dict()
    if ema is not None:
        prefix = "head." if head_only else ""
        state.update({prefix + name: value for name, value in ema.module.state_dict().items()})
    return {name: value.detach().cpu() for name, value in state.items()}


@torch.no_grad()
def compute_embeddings(model: Classifier, split: SplitTensors, batch_size: int, device: torch.device,
                       memory_format: torch.memory_format, amp: str = "none") -> SplitTensors:
    """The frozen body's pooled features for every image of a split, on the split's device.

    ``no_grad`` rather than ``inference_mode``: the head is then trained on these tensors,
    and autograd refuses inference tensors. ``amp`` is the precision the uncached path would
    run the body in, so both paths train the head on the same features. They are kept in
    the dtype the body returns (bf16 under bf16 autocast): the head's autocast would cast
    float32 copies straight back, and shuffling half the bytes every epoch is a large part
    of a step that costs a fraction of a millisecond.
    """
    model.eval()
    chunks = []
    for images, _ in iterate_batches(split.inputs, split.labels, batch_size):
        with autocast(device, amp):
            chunks.append(model.embed(to_input(images, device, memory_format)))
    return SplitTensors(torch.cat(chunks).to(split.inputs.device), split.labels)


def _fingerprint(approach: str, params: Params, image_size: int, sizes: tuple[int, int]) -> str:
    """What a resumable run must share with the interrupted one: recipe, seed, classes and data shape.

    A data-parallel run also fixes its number of processes (it sets the steps per epoch);
    single-process fingerprints leave it out, so they match those of earlier versions.
    """
    identity = {
        "approach": approach,
        "recipe": as_dict(params.approach(approach)),
        "seed": params.train.seed,
        "classes": list(params.data.classes),
        "image_size": image_size,
        "sizes": list(sizes),
    }
    if distributed.world_size() > 1:
        identity["world_size"] = distributed.world_size()
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def load_resume_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The last complete epoch of an interrupted run with the same fingerprint, else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable resume file only means "start from scratch"
        log.warning("ignoring unreadable resume state %s", path)
        return None
    if state.get("fingerprint") != fingerprint or state.get("finished"):
        return None
    return state


def _log_history(live: Live | None, history: list[dict[str, float]]) -> None:
    """Append rows to the learning curves; ``live`` is None on ranks other than 0, which write nothing."""
    if live is None:
        return
    for row in history:
        for name, value in row.items():
            live.log_metric(name, value)
        live.next_step()


def _epoch_row(train: EpochResult, val: EpochResult) -> dict[str, float]:
    return {
        f"{prefix}/{name}": round(getattr(result, name), 6)
        for prefix, result in (("train", train), ("val", val))
        for name in ("loss", "accuracy", "macro_f1")
    }


def _reduced(result: EpochResult) -> EpochResult:
    """The result over every rank's items (the same on all ranks); a single process's result as it is."""
    return combine_results(distributed.all_gather(result)) if distributed.active() else result


def _train_batches(split: SplitTensors, batch_size: int, order: torch.Generator, seed: int, epoch: int,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's shuffled batches: the whole split from ``order``, or under DDP this rank's DistributedSampler share."""
    if not distributed.active():
        return iterate_batches(split.inputs, split.labels, batch_size, order)
    return batches_in_order(split.inputs, split.labels, distributed.epoch_order(len(split), seed, epoch), batch_size)


def _reseed_rank(seed: int, epoch: int, augment_rng: torch.Generator) -> None:
    """Under DDP, draw this epoch's augmentations and dropout masks from per-rank seeds (see ``seed_for``)."""
    if distributed.active():
        augment_rng.manual_seed(distributed.seed_for(seed, 1, epoch))
        torch.manual_seed(distributed.seed_for(seed, 2, epoch))


def _validate(model: nn.Module, split: SplitTensors, batch_size: int, loss_fn: nn.Module, common: dict[str, Any],
              ) -> EpochResult:
    """Validation scores of ``model``; under DDP each rank scores a contiguous shard and the shards are gathered.

    Every rank first takes rank 0's BatchNorm statistics, so the result is exactly that of
    one process scoring the weights the checkpoint saves (up to float rounding of the loss).
    """
    distributed.broadcast_buffers(model)
    part = distributed.shard(len(split))
    batches = iterate_batches(split.inputs[part], split.labels[part], batch_size)
    return _reduced(evaluate(model, batches, part.stop - part.start, loss_fn, desc="val", **common))


def train_approach(
    approach: str,
    params: Params,
    processed_dir: Path,
    model_path: Path,
    live_dir: Path,
    resume_path: Path | None = None,
    imagenet: Callable[[], dict[str, torch.Tensor]] = imagenet_state_dict,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``approach`` per ``params`` and save its best epoch (by validation macro-F1).

    With ``ema_decay`` set, the moving average of the weights is what is validated and saved.
    After every epoch the whole training state (model, optimizer, scheduler, weight average,
    random generators, early-stopping counters, learning-curve history) goes to ``resume_path``;
    a killed run started again with the same params resumes from the last complete epoch
    and ends exactly where an uninterrupted run would.

    Under ``torchrun --nproc_per_node=N`` (see :mod:`cxr.distributed`) the model trains in
    DistributedDataParallel: each rank takes a DistributedSampler share of every epoch in
    batches of ``batch_size``, so the effective batch is N x ``batch_size`` (as in the
    torchvision reference scripts; halve ``batch_size`` to keep the single-process one).
    Train and validation results are gathered from all ranks before any metric is computed,
    so every rank takes the same early-stopping decision; only rank 0 logs and writes the
    learning curves, the checkpoint and the resume state.

    Returns a summary (best epoch, its validation scores, epochs run, whether embeddings were cached).
    """
    device = distributed.rank_device(configure(params.train))
    with distributed.process_group(device):
        distributed.quiet_other_ranks()
        return _train(approach, params, processed_dir, model_path, live_dir, resume_path, imagenet,
                      progress and distributed.is_main(), device)


def _train(
    approach: str,
    params: Params,
    processed_dir: Path,
    model_path: Path,
    live_dir: Path,
    resume_path: Path | None,
    imagenet: Callable[[], dict[str, torch.Tensor]],
    progress: bool,
    device: torch.device,
) -> dict[str, Any]:
    recipe = params.approach(approach)
    runtime = params.train
    main = distributed.is_main()
    classes = list(params.data.classes)
    train_split = load_tensors(processed_dir, "train", classes)
    val_split = load_tensors(processed_dir, "val", classes)
    if device.type == "cuda":
        # The uint8 split fits on the GPU (0.4 GB for 8,000 images at 224 px): batches are then
        # sliced there and never cross the host-device bus during training.
        train_split, val_split = train_split.to(device), val_split.to(device)
    image_size = int(train_split.inputs.shape[-1])
    fingerprint = _fingerprint(approach, params, image_size, (len(train_split), len(val_split)))
    resumed = load_resume_state(resume_path, fingerprint) if resume_path else None

    model_args = model_args_for(approach, recipe, train_split.inputs, len(classes))
    needs_backbone = model_args["arch"] == "resnet18" and resumed is None
    backbone = backbone_weights(recipe.weights, imagenet) if needs_backbone else None
    memory_format = memory_format_of(runtime)
    model = build_model(**model_args, backbone_state=backbone).to(device, memory_format=memory_format)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    frozen = approach == "extract"
    if frozen:
        model.freeze_body()

    cached = frozen and recipe.cache_embeddings and not recipe.augment.enabled
    if cached:
        log.info("extract: caching the frozen body's embeddings once per split, then training the head on them")
        train_split, val_split = (
            compute_embeddings(model, split, params.evaluate.batch_size, device, memory_format, runtime.amp)
            for split in (train_split, val_split)
        )
    elif frozen:
        log.info("extract: the frozen body runs on every batch (augmentation on or cache_embeddings off)")
    trained: nn.Module = model.head if cached else model
    step_model = distributed.wrap(trained, device)
    if runtime.compile and not cached:
        step_model = torch.compile(step_model)
    ema = make_ema(trained, recipe.ema_decay)
    if ema is not None:
        eval_model = ema.module
    else:  # DDP's forward takes part in collectives; ranks score their shards with the plain module.
        eval_model = trained if distributed.active() else step_model
    log.info("%s: %s", approach, describe_precision(device, runtime.amp))
    if distributed.active():
        log.info("%s: DistributedDataParallel over %d processes (%s), batch %d per process = %d per step",
                 approach, distributed.world_size(), distributed.backend_for(device), recipe.batch_size,
                 recipe.batch_size * distributed.world_size())

    optimizer = make_optimizer(recipe, [p for p in model.parameters() if p.requires_grad])
    per_rank = math.ceil(len(train_split) / distributed.world_size())
    steps_per_epoch = math.ceil(per_rank / recipe.batch_size)
    scheduler = make_scheduler(recipe, optimizer, steps_per_epoch)
    if ema is not None:
        log.info("%s: validating and saving a moving average of the weights (decay %g per step: ~%.1f epochs)",
                 approach, recipe.ema_decay, 1 / (1 - recipe.ema_decay) / steps_per_epoch)
    order = torch.Generator().manual_seed(runtime.seed)
    augment_rng = torch.Generator().manual_seed(runtime.seed + 1)
    progress_state: dict[str, Any] = {"epoch": 0, "best": {"epoch": -1, "val_macro_f1": -1.0}, "stale": 0, "history": []}
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resumed["scheduler"])
        if ema is not None:
            ema.load_state_dict(resumed["ema"])
        order.set_state(resumed["order_rng"])
        augment_rng.set_state(resumed["augment_rng"])
        torch.set_rng_state(resumed["torch_rng"])
        if device.type == "cuda" and len(resumed.get("cuda_rng", ())):
            torch.cuda.set_rng_state(resumed["cuda_rng"], device)
        progress_state = {k: resumed[k] for k in progress_state}
        log.info("%s: resuming after epoch %d from %s", approach, progress_state["epoch"], resume_path)

    train_loss = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()
    transform = None if cached or not recipe.augment.enabled else (lambda x: augment_batch(x, recipe.augment, augment_rng))
    common = {"device": device, "amp": runtime.amp, "memory_format": memory_format, "progress": progress}

    def save_resume_state(finished: bool) -> None:
        state = {
            "fingerprint": fingerprint,
            "finished": finished,
            "model": saved_weights(model),  # the raw weights training continues from
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "ema": ema.state_dict() if ema is not None else {},
            "order_rng": order.get_state(),
            "augment_rng": augment_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
            **progress_state,
        }
        atomic_write(resume_path, lambda tmp: torch.save(state, tmp))

    best = progress_state["best"]
    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None) if main else nullcontext() as live:
        _log_history(live, progress_state["history"])
        for epoch in range(progress_state["epoch"], recipe.epochs):
            if recipe.patience and progress_state["stale"] >= recipe.patience:
                break
            started = time.perf_counter()
            _reseed_rank(runtime.seed, epoch, augment_rng)
            train_result = _reduced(train_one_epoch(
                step_model, _train_batches(train_split, recipe.batch_size, order, runtime.seed, epoch),
                per_rank, optimizer, scheduler, train_loss, transform=transform, ema=ema,
                desc=f"{approach} {epoch + 1}/{recipe.epochs}", **common,
            ))
            val_result = _validate(eval_model, val_split, params.evaluate.batch_size, eval_loss, common)
            row = _epoch_row(train_result, val_result)
            _log_history(live, [row])
            log.info(
                "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f | %.0f img/s",
                approach, epoch + 1, recipe.epochs, train_result.loss, train_result.accuracy,
                val_result.loss, val_result.accuracy, val_result.macro_f1,
                len(train_result.labels) / (time.perf_counter() - started),
            )
            if val_result.macro_f1 > best["val_macro_f1"]:
                best = {"epoch": epoch + 1, "val_macro_f1": val_result.macro_f1, "val_accuracy": val_result.accuracy}
                if main:
                    checkpoint = {
                        "model": saved_weights(model, ema, head_only=cached),
                        "model_args": model_args,
                        "approach": approach,
                        "classes": classes,
                        "image_size": image_size,
                        "recipe": as_dict(recipe),
                        **best,
                    }
                    atomic_write(model_path, lambda tmp: torch.save(checkpoint, tmp))
                progress_state["stale"] = 0
            else:
                progress_state["stale"] += 1
            progress_state.update(epoch=epoch + 1, best=best)
            progress_state["history"].append(row)
            if resume_path and main:
                save_resume_state(finished=False)
    if best["epoch"] < 0:
        raise PipelineError(f"{approach}: training produced no checkpoint")
    if progress_state["stale"] and recipe.patience and progress_state["stale"] >= recipe.patience:
        log.info("%s: stopped early, no validation macro-F1 gain for %d epochs", approach, progress_state["stale"])
    if resume_path and main:
        save_resume_state(finished=True)
    return {**best, "epochs_run": progress_state["epoch"], "cached_embeddings": cached}
