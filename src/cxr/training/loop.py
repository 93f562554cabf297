"""Fit one approach (custom CNN, feature extraction or fine-tuning) and keep its best epoch.

One module serves the three training stages; they differ only by their params section.
With a frozen body and no augmentation, feature extraction computes the body's embeddings
once per split and trains the head on them: the result is the same model as running the
frozen body every epoch, many times faster.

Launched with ``torchrun --nproc_per_node=N stages/train.py <approach>``, the same code trains
data-parallel (DistributedDataParallel, see :mod:`cxr.training.distributed`); launched with python it
is the single-process run, unchanged.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvclive import Live
from torch import nn
from torch.optim.swa_utils import AveragedModel

from cxr.approaches import REGISTRY
from cxr.data.preprocess import load_split
from cxr.errors import PipelineError, first_line
from cxr.files import atomic_write
from cxr.params import Params, TrainParams, as_dict
from cxr.training import balance, distributed
from cxr.training.augment import training_transform
from cxr.training.engine import (
    EpochResult,
    Images,
    batches_in_order,
    combine_results,
    evaluate,
    iterate_batches,
    to_input,
    train_one_epoch,
)
from cxr.training.models import IMAGENET_MEAN, IMAGENET_STD, Classifier, backbone_weights, build_model, imagenet_state_dict
from cxr.training.runtime import amp_dtype, autocast, configure, describe_precision, memory_format_of

log = logging.getLogger(__name__)


@dataclass
class SplitTensors:
    """A split: uint8 images (N x H x W, a memory map or a device tensor) or float embeddings (N x D), int64 labels."""

    inputs: Images
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return self.inputs.device if isinstance(self.inputs, torch.Tensor) else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return self.inputs.nbytes if isinstance(self.inputs, np.ndarray) else self.inputs.nelement() * self.inputs.element_size()

    def to(self, device: torch.device, chunk: int = 1024) -> SplitTensors:
        """The split held on ``device``, copied from a memory map in chunks so host memory stays bounded."""
        if isinstance(self.inputs, torch.Tensor):
            return SplitTensors(self.inputs.to(device), self.labels.to(device))
        held = torch.empty(self.inputs.shape, dtype=torch.uint8, device=device)
        for start, block in zip(range(0, len(self), chunk), _chunks(self.inputs, chunk)):
            held[start : start + chunk] = block.to(device)
        return SplitTensors(held, self.labels.to(device))


def load_tensors(processed_dir: Path, split: str, classes: list[str]) -> SplitTensors:
    """A preprocessed split with its images memory-mapped (see :func:`~cxr.data.preprocess.load_split`)."""
    images, labels, _ = load_split(processed_dir, split, classes)
    return SplitTensors(images, torch.from_numpy(labels))


def _chunks(images: Images, chunk: int) -> Iterator[torch.Tensor]:
    """Consecutive blocks of ``images`` as tensors; only one block of a memory map is read at a time."""
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk]
        yield torch.from_numpy(np.array(block)) if isinstance(block, np.ndarray) else block


def pixel_stats(images: Images, chunk: int = 512) -> tuple[float, float]:
    """Mean and standard deviation of all pixels in [0, 1], computed in float64 chunks."""
    total, total_sq, count = 0.0, 0.0, 0
    for pixels in _chunks(images, chunk):
        block = pixels.double().div(255)
        total, total_sq, count = total + block.sum().item(), total_sq + block.square().sum().item(), count + block.numel()
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean**2, 1e-12))
def model_args_for(approach: str, recipe: TrainParams, train_images: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """The primitive arguments that rebuild the architecture (stored in the checkpoint)."""
    arch = REGISTRY[approach].arch
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
        "lung_box": recipe.lung_box if recipe.border != "keep" else 0.0,
        "crop": recipe.border == "crop",
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
    """A CPU copy of the model's weights, with the averaged ones for the part that was trained (the head, or all).

    A copy, not a view: the best epoch's weights are kept in memory while training goes on.
    """
    state = model.state_dict()
    if ema is not None:
        prefix = "head." if head_only else ""
        state.update({prefix + name: value for name, value in ema.module.state_dict().items()})
    return {name: value.detach().to("cpu", copy=True) for name, value in state.items()}


@torch.no_grad()
def compute_embeddings(model: Classifier, split: SplitTensors, batch_size: int, device: torch.device,
                       memory_format: torch.memory_format, amp: str = "none") -> SplitTensors:
    """The frozen body's pooled features for every image of a split, on the split's device.

    ``no_grad`` rather than ``inference_mode``: the head is then trained on these tensors,
    and autograd refuses inference tensors. ``amp`` is the precision the uncached path would
    run the body in, so both paths train the head on the same features. They are kept in
    the dtype the body returns (bf16 under bf16 autocast): the head's autocast would cast
    float32 copies straight back, and shuffling half the bytes every epoch is a large part
    of a step that costs a fraction of a millisecond. Each batch's features go straight into
    one preallocated tensor (1 KB per image in bf16), with no list of parts to concatenate.
    """
    model.eval()
    features: torch.Tensor | None = None
    start = 0
    for images, _ in iterate_batches(split.inputs, split.labels, batch_size):
        with autocast(device, amp):
            batch = model.embed(to_input(images, device, memory_format))
        if features is None:
            features = torch.empty((len(split), *batch.shape[1:]), dtype=batch.dtype, device=split.device)
        features[start : start + len(batch)] = batch
        start += len(batch)
    if features is None:
        raise PipelineError("cannot compute embeddings of an empty split")
    return SplitTensors(features, split.labels)


def data_digest(*splits: SplitTensors) -> str:
    """A digest of the splits' pixels and labels: a run resumes only on the very data it started on."""
    digest = hashlib.blake2b(digest_size=16)
    for split in splits:
        for block in itertools.chain(_chunks(split.inputs, 1024), [split.labels]):
            digest.update(block.cpu().contiguous().numpy().data)
    return digest.hexdigest()


def code_digest() -> str:
    """A digest of the library's source: a run resumed under edited code would match neither version."""
    digest = hashlib.blake2b(digest_size=16)
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_fingerprint(approach: str, params: Params, image_size: int, data: str, groups: str | None = None) -> str:
    """What a resumed run must share with the interrupted one for its result to equal an uninterrupted run.

    The recipe, every ``train`` setting (precision, threads and layout can change the
    arithmetic), the validation batch size, classes, image size, the data's digest, the
    images' groups where the recipe reads them (:func:`~cxr.training.balance.groups_digest`), the library's source
    and the number of processes (it sets the steps per epoch).
    """
    identity = {
        "approach": approach,
        "recipe": as_dict(params.approach(approach)),
        "train": as_dict(params.train),
        "eval_batch_size": params.evaluate.batch_size,
        "classes": list(params.data.classes),
        "image_size": image_size,
        "data": data,
        "groups": groups,
        "code": code_digest(),
        "world_size": distributed.world_size(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def load_resume_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The last complete epoch of an interrupted run with the same fingerprint, else None.

    A file that cannot be used is never an error, since starting afresh is always correct;
    the log says in one line why it was not resumed.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file; all mean "start afresh"
        log.warning("%s is unreadable (%s): training from scratch", path, first_line(err))
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        log.warning("%s was saved with other params, data or code: training from scratch", path)
        return None
    if state.get("finished"):
        log.info("%s belongs to a finished run: training from scratch", path)
        return None
    return state


def make_grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A loss scaler where training runs in fp16 (CUDA), as torchvision's and timm's scripts use.

    fp16 has 5 exponent bits: small gradients underflow to zero unless the loss is scaled
    up first. bf16 has fp32's range and needs no scaler, nor does fp32.
    """
    if amp_dtype(device, amp) is not torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


class TrainingState:
    """Everything a run carries from one epoch to the next, saved whole after every epoch.

    Loading it back continues a killed run exactly where it stopped: raw weights, optimizer,
    scheduler, weight average, loss scaler, random generators (a balanced epoch is drawn from
    ``order_rng`` too), early-stopping counters and the learning-curve history. It also holds
    the best epoch's checkpoint, because DVC deletes ``models/<approach>.pt`` before it reruns
    a stage: a resumed run whose later epochs never beat that best must still be able to write it.

    ``select`` is the criterion of the best epoch: validation macro-F1, or the worst validation
    group's accuracy with macro-F1 breaking ties.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, ema: AveragedModel | None,
                 scaler: torch.amp.GradScaler | None, seed: int, device: torch.device, select: str = "macro_f1") -> None:
        self.model, self.optimizer, self.scheduler, self.ema, self.scaler = model, optimizer, scheduler, ema, scaler
        self.device, self.select = device, select
        self.order_rng = torch.Generator().manual_seed(seed)
        self.augment_rng = torch.Generator().manual_seed(seed + 1)
        self.epoch = 0
        self.best: dict[str, Any] = {"epoch": -1, "val_macro_f1": -1.0}
        if select == "worst_group":
            self.best["val_worst_group_acc"] = -1.0
        self.stale = 0
        self.history: list[dict[str, float]] = []
        self.best_checkpoint: dict[str, Any] = {}

    def _criterion(self, scores: dict[str, Any]) -> tuple[float, ...]:
        if self.select == "worst_group":
            return scores["val_worst_group_acc"], scores["val_macro_f1"]
        return (scores["val_macro_f1"],)

    def record(self, row: dict[str, float], val: EpochResult, checkpoint: Callable[[], dict[str, Any]],
               worst_group_acc: float | None = None) -> None:
        """Close an epoch: log its row; keep ``checkpoint()`` when the epoch beat the best so far by ``select``.

        ``worst_group_acc`` is the epoch's worst validation group accuracy, None where the run has no groups.
        """
        self.epoch += 1
        self.history.append(row)
        scores = {"epoch": self.epoch, "val_macro_f1": val.macro_f1, "val_accuracy": val.accuracy}
        if worst_group_acc is not None:
            scores["val_worst_group_acc"] = worst_group_acc
        if self._criterion(scores) > self._criterion(self.best):
            self.best = scores
            self.best_checkpoint = {**checkpoint(), **self.best}
            self.stale = 0
        else:
            self.stale += 1

    def exhausted(self, patience: int) -> bool:
        """Whether early stopping ends the run (``patience`` 0 never stops)."""
        return bool(patience) and self.stale >= patience

    def state_dict(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {
            "model": saved_weights(self.model),  # the raw weights training continues from
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "order_rng": self.order_rng.get_state(),
            "augment_rng": self.augment_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else torch.empty(0, dtype=torch.uint8),
            "epoch": self.epoch,
            "best": self.best,
            "stale": self.stale,
            "history": self.history,
            "best_checkpoint": self.best_checkpoint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for part in ("scheduler", "ema", "scaler"):
            if getattr(self, part) is not None:
                getattr(self, part).load_state_dict(state[part])
        self.order_rng.set_state(state["order_rng"])
        self.augment_rng.set_state(state["augment_rng"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and len(state["cuda_rng"]):
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.epoch, self.best, self.stale = state["epoch"], state["best"], state["stale"]
        self.history, self.best_checkpoint = state["history"], state["best_checkpoint"]


def _log_history(live: Live | None, history: list[dict[str, float]]) -> None:
    """Append rows to the learning curves; ``live`` is None on ranks other than 0, which write nothing."""
    if live is None:
        return
    for row in history:
        for name, value in row.items():
            live.log_metric(name, value)
        live.next_step()


def _best_summary(state: TrainingState) -> dict[str, Any]:
    """What ``dvclive/<approach>/metrics.json`` (a DVC metrics file) holds: the saved epoch and its validation macro-F1.

    DVCLive's summary would hold the last epoch's six curves; the checkpoint is the best
    epoch's, so that is what ``dvc exp show`` lists beside DVCLive's ``step`` (the last epoch run, from 0).
    """
    summary = {"best_epoch": state.best["epoch"], "best_val_f1": round(state.best["val_macro_f1"], 6)}
    if "val_worst_group_acc" in state.best:
        summary["best_val_worst_group_acc"] = round(state.best["val_worst_group_acc"], 6)
    return summary


def _epoch_row(train: EpochResult, val: EpochResult, worst_group_acc: float | None) -> dict[str, float]:
    row = {
        f"{prefix}/{name}": round(getattr(result, name), 6)
        for prefix, result in (("train", train), ("val", val))
        for name in ("loss", "accuracy", "macro_f1")
    }
    if worst_group_acc is not None:
        row["val/worst_group_acc"] = round(worst_group_acc, 6)
    return row


def _reduced(result: EpochResult) -> EpochResult:
    """The result over every rank's items (the same on all ranks); a single process's result as it is."""
    return combine_results(distributed.all_gather(result)) if distributed.active() else result


def _train_batches(split: SplitTensors, batch_size: int, order: torch.Generator, seed: int, epoch: int,
                   weights: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's shuffled batches: the whole split from ``order``, or under DDP this rank's DistributedSampler share.

    With draw ``weights`` (``balance`` other than none) the epoch is a balanced draw instead
    (:func:`~cxr.training.balance.epoch_order`); without them the path is the plain shuffle, untouched.
    """
    if weights is not None:
        return batches_in_order(split.inputs, split.labels, balance.epoch_order(weights, order, seed, epoch), batch_size)
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
    """Train ``approach`` per ``params`` and save its best epoch (by validation macro-F1, or ``select``).

    With ``ema_decay`` set, the moving average of the weights is what is validated and saved.
    With ``balance`` set, epochs are balanced draws over classes or (group, class) cells
    (:mod:`cxr.training.balance`); a recipe that reads groups logs the worst validation group's accuracy.
    After every epoch the whole :class:`TrainingState` goes to ``resume_path``; a killed run
    started again with the same params, data and code resumes from the last complete epoch
    and ends exactly where an uninterrupted run would. The checkpoint is written once, at the
    end, from the best epoch the state holds.

    Under ``torchrun --nproc_per_node=N`` (see :mod:`cxr.training.distributed`) the model trains in
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
        run = _prepare(approach, params, processed_dir, device, imagenet, resume_path, progress and distributed.is_main())
        state = _fit(run, live_dir, resume_path)
        if state.best["epoch"] < 0:
            raise PipelineError(f"{approach}: training produced no checkpoint")
        if distributed.is_main():
            atomic_write(model_path, lambda tmp: torch.save(state.best_checkpoint, tmp))
            if resume_path:
                _save_resume(resume_path, run.fingerprint, state, finished=True)
        return {**state.best, "epochs_run": state.epoch, "cached_embeddings": run.cached}


@dataclass
class _Run:
    """What stays fixed while a run trains: its data, the modules it steps and scores, its settings."""

    approach: str
    params: Params
    device: torch.device
    train_split: SplitTensors
    val_split: SplitTensors
    model: Classifier
    step_model: nn.Module
    eval_model: nn.Module
    model_args: dict[str, Any]
    image_size: int
    cached: bool
    fingerprint: str
    state: TrainingState
    common: dict[str, Any]
    groups: balance.ImageGroups | None  # each train and val image's group, where the recipe reads them
    draw_weights: torch.Tensor | None  # per training image, for a balanced epoch; None: the plain shuffle

    def worst_group_acc(self, val: EpochResult) -> float | None:
        """The worst validation group's accuracy (groups of at least ``groups.min_images``); None without groups.

        Validation results list the images in split order, under DDP too (shards gathered in rank order).
        """
        if self.groups is None or self.params.grouping is None:
            return None
        correct = val.predictions == val.labels
        return balance.worst_group_accuracy(correct, self.groups.val, self.params.grouping.min_images)

    @property
    def recipe(self) -> TrainParams:
        return self.params.approach(self.approach)


def _prepare(approach: str, params: Params, processed_dir: Path, device: torch.device,
             imagenet: Callable[[], dict[str, torch.Tensor]], resume_path: Path | None, progress: bool) -> _Run:
    """Load the data, build the model and its training state, restored from ``resume_path`` when it matches."""
    recipe, runtime, classes = params.approach(approach), params.train, list(params.data.classes)
    train_split, val_split = (load_tensors(processed_dir, split, classes) for split in ("train", "val"))
    image_size = int(train_split.inputs.shape[-1])
    groups = balance.image_groups(params, approach, processed_dir)
    group_key = balance.groups_digest(groups, params.grouping.min_images) if groups and params.grouping else None
    fingerprint = run_fingerprint(approach, params, image_size, data_digest(train_split, val_split), group_key)
    resumed = load_resume_state(resume_path, fingerprint) if resume_path else None
    if device.type == "cuda":
        train_split, val_split = _place_on_gpu(approach, train_split, val_split, device, runtime.gpu_data_gb)
    model_args = model_args_for(approach, recipe, train_split.inputs, len(classes))
    needs_backbone = model_args["arch"] == "resnet18" and resumed is None  # resumed weights replace it
    backbone = backbone_weights(recipe.weights, imagenet) if needs_backbone else None
    memory_format = memory_format_of(runtime)
    model = build_model(**model_args, backbone_state=backbone).to(device, memory_format=memory_format)
    frozen = REGISTRY[approach].frozen_body
    cached = frozen and recipe.cache_embeddings and not recipe.augment.enabled
    if frozen:
        model.freeze_body()
        log.info("%s: %s", approach, "caching the frozen body's embeddings once per split, then training the head on "
                 "them" if cached else "the frozen body runs on every batch (augmentation on or cache_embeddings off)")
    if cached:
        train_split, val_split = (
            compute_embeddings(model, split, params.evaluate.batch_size, device, memory_format, runtime.amp)
            for split in (train_split, val_split)
        )
    trained: nn.Module = model.head if cached else model
    step_model, eval_model, state = _training_modules(approach, model, trained, params, device, len(train_split), cached)
    if resumed is not None:
        state.load_state_dict(resumed)
        log.info("%s: resuming after epoch %d from %s", approach, state.epoch, resume_path)
    common = {"device": device, "amp": runtime.amp, "memory_format": memory_format, "progress": progress}
    return _Run(approach, params, device, train_split, val_split, model, step_model, eval_model, model_args,
                image_size, cached, fingerprint, state, common, groups,
                balance.draw_weights(approach, params, train_split.labels, groups))


def _place_on_gpu(approach: str, train: SplitTensors, val: SplitTensors, device: torch.device, budget_gb: float,
                  ) -> tuple[SplitTensors, SplitTensors]:
    """Splits within the GPU data budget move there once (0.4 GB for 8,000 images at 224 px), so
    batches never cross the host-device bus; larger ones stay memory-mapped and stream."""
    size_gb = (train.nbytes + val.nbytes) / 2**30
    if size_gb <= budget_gb:
        return train.to(device), val.to(device)
    log.info("%s: streaming batches from the memory-mapped splits (%.1f GB > train.gpu_data_gb %g)",
             approach, size_gb, budget_gb)
    return train, val


def _training_modules(approach: str, model: Classifier, trained: nn.Module, params: Params, device: torch.device,
                      items: int, cached: bool) -> tuple[nn.Module, nn.Module, TrainingState]:
    """The module each step calls (DDP-wrapped, compiled), the one validation scores, and a fresh training state."""
    recipe, runtime = params.approach(approach), params.train
    step_model = distributed.wrap(trained, device)
    if runtime.compile and not cached:
        step_model = torch.compile(step_model)
    ema = make_ema(trained, recipe.ema_decay)
    if ema is not None:
        eval_model = ema.module
    else:  # DDP's forward takes part in collectives; ranks score their shards with the plain module.
        eval_model = trained if distributed.active() else step_model
    optimizer = make_optimizer(recipe, [p for p in model.parameters() if p.requires_grad])
    steps_per_epoch = math.ceil(math.ceil(items / distributed.world_size()) / recipe.batch_size)
    scheduler = make_scheduler(recipe, optimizer, steps_per_epoch)
    log.info("%s: %s", approach, describe_precision(device, runtime.amp))
    if distributed.active():
        log.info("%s: DistributedDataParallel over %d processes (%s), batch %d per process = %d per step",
                 approach, distributed.world_size(), distributed.backend_for(device), recipe.batch_size,
                 recipe.batch_size * distributed.world_size())
    if ema is not None:
        log.info("%s: validating and saving a moving average of the weights (decay %g per step: ~%.1f epochs)",
                 approach, recipe.ema_decay, 1 / (1 - recipe.ema_decay) / steps_per_epoch)
    scaler = make_grad_scaler(device, runtime.amp)
    return step_model, eval_model, TrainingState(model, optimizer, scheduler, ema, scaler, runtime.seed, device,
                                                 recipe.select)


def _save_resume(path: Path, fingerprint: str, state: TrainingState, finished: bool) -> None:
    payload = {"fingerprint": fingerprint, "finished": finished, **state.state_dict()}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _checkpoint(run: _Run) -> dict[str, Any]:
    """The plain-dict checkpoint of the weights as they are now (the moving average where there is one)."""
    return {
        "model": saved_weights(run.model, run.state.ema, head_only=run.cached),
        "model_args": run.model_args,
        "approach": run.approach,
        "classes": list(run.params.data.classes),
        "image_size": run.image_size,
        "recipe": as_dict(run.recipe),
    }


def _fit(run: _Run, live_dir: Path, resume_path: Path | None) -> TrainingState:
    """The epoch loop: train, validate, record, save the state; stops at ``epochs`` or by early stopping."""
    recipe, state, seed = run.recipe, run.state, run.params.train.seed
    train_loss = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()
    transform = training_transform(recipe, state.augment_rng, pixels=not run.cached)
    per_rank = math.ceil(len(run.train_split) / distributed.world_size())
    main = distributed.is_main()
    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None) if main else nullcontext() as live:
        _log_history(live, state.history)
        while state.epoch < recipe.epochs and not state.exhausted(recipe.patience):
            started, epoch = time.perf_counter(), state.epoch
            _reseed_rank(seed, epoch, state.augment_rng)
            batches = _train_batches(run.train_split, recipe.batch_size, state.order_rng, seed, epoch, run.draw_weights)
            train_result = _reduced(train_one_epoch(
                run.step_model, batches, per_rank, state.optimizer, state.scheduler, train_loss, transform=transform,
                ema=state.ema, scaler=state.scaler, desc=f"{run.approach} {epoch + 1}/{recipe.epochs}", **run.common,
            ))
            val_result = _validate(run.eval_model, run.val_split, run.params.evaluate.batch_size, eval_loss, run.common)
            worst = run.worst_group_acc(val_result)
            row = _epoch_row(train_result, val_result, worst)
            state.record(row, val_result, lambda: _checkpoint(run), worst)
            _log_history(live, [row])
            log.info(
                "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f | %.0f img/s",
                run.approach, epoch + 1, recipe.epochs, train_result.loss, train_result.accuracy,
                val_result.loss, val_result.accuracy, val_result.macro_f1,
                len(train_result.labels) / (time.perf_counter() - started),
            )
            if resume_path and main:
                _save_resume(resume_path, run.fingerprint, state, finished=False)
        if live is not None:  # the last epoch's curves give way to the best epoch's; "step" stays DVCLive's last step
            live.summary = {"step": live.summary["step"], **_best_summary(state)}
    if state.exhausted(recipe.patience):
        criterion = "worst-group accuracy" if recipe.select == "worst_group" else "macro-F1"
        log.info("%s: stopped early, no validation %s gain for %d epochs", run.approach, criterion, state.stale)
    return state
