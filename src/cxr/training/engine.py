"""One pass over the data: ``train_one_epoch`` and ``evaluate``, shared by every approach.

Batches are cut from uint8 arrays (memory-mapped splits, or tensors already on the device)
and converted to float on the fly, so the time of a step goes into the model's arithmetic,
not into decoding or copying. On CUDA, batches read from the host go through pinned memory
with the next one already on its way while the current one computes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from cxr.training.runtime import autocast

BatchTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EpochResult:
    """Loss and predictions of one pass; accuracy and macro-F1 derive from them."""

    loss: float
    labels: np.ndarray
    probabilities: np.ndarray

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.labels).mean())

    @property
    def macro_f1(self) -> float:
        """The report's macro-F1 rule (``cxr.stats.macro_f1``): every class counts, one never seen scores 0.

        Without ``labels``, a class absent from a validation shard would drop out of the mean and
        raise the score that picks the checkpoint.
        """
        classes = range(self.probabilities.shape[1])
        return float(f1_score(self.labels, self.predictions, labels=classes, average="macro", zero_division=0))


# What evaluating no items gives (a rank whose validation shard is empty); combine_results skips it.
EMPTY_RESULT = EpochResult(0.0, np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32))


class _Tally:
    """Labels and logits of a pass, kept on the device that computed them.

    One host transfer, one softmax and one loss per pass instead of per batch: on a GPU that
    removes a synchronisation from every step, on a CPU per-step work that is a visible share
    of a step of the head trained on cached embeddings. The loss is computed once from the kept
    logits: the item-weighted mean of the batches' losses, up to float rounding. Loss and
    softmax run classes-first (1 x C x N), along the long axis rather than the 3-wide rows,
    where the kernels vectorise.

    The batches are copied into two buffers that double when full, rather than kept as a list
    of small tensors: small blocks that live for the whole pass, scattered between the step's
    large freed ones, would fragment the heap and grow memory with every batch of a long pass.
    """

    def __init__(self, loss_fn: nn.Module) -> None:
        self.loss_fn = loss_fn
        self.count = 0
        self.labels = torch.empty(0, dtype=torch.long)
        self.logits = torch.empty(0, 0)

    def add(self, labels: torch.Tensor, logits: torch.Tensor) -> None:
        end = self.count + len(labels)
        if end > len(self.labels) or self.logits.dtype != logits.dtype or self.logits.device != logits.device:
            self._grow(max(end, 2 * len(self.labels)), labels, logits)
        self.labels[self.count : end] = labels
        self.logits[self.count : end] = logits
        self.count = end

    def _grow(self, capacity: int, labels: torch.Tensor, logits: torch.Tensor) -> None:
        grown_labels = labels.new_empty((capacity, *labels.shape[1:]))
        grown_logits = logits.new_empty((capacity, *logits.shape[1:]))
        if self.count:
            grown_labels[: self.count] = self.labels[: self.count]
            grown_logits[: self.count] = self.logits[: self.count]
        self.labels, self.logits = grown_labels, grown_logits

    def result(self) -> EpochResult:
        if not self.count:
            return EMPTY_RESULT
        labels = self.labels[: self.count]
        logits = self.logits[: self.count].float().t().unsqueeze(0).contiguous()
        loss = self.loss_fn(logits, labels.unsqueeze(0))
        probabilities = logits[0].softmax(0).t().cpu().numpy()
        return EpochResult(float(loss), labels.cpu().numpy(), np.ascontiguousarray(probabilities))


Images = torch.Tensor | np.ndarray
"""A split's inputs: a tensor (pixels or cached embeddings, in memory or on the GPU), or
uint8 pixels in a NumPy array, usually the read-only memory map of a preprocessed split."""


def iterate_batches(
    images: Images, labels: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(uint8 images, labels)`` batches, shuffled when a generator is given.

    ``images`` may hold raw pixels (N x H x W) or cached embeddings (N x D).
    """
    if generator is None:
        return _slices(images, labels, batch_size)
    return batches_in_order(images, labels, torch.randperm(len(images), generator=generator), batch_size)


def _slices(images: Images, labels: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches: views of a tensor (no copy, cut in one call), or rows read from an array."""
    if isinstance(images, np.ndarray):
        return ((torch.from_numpy(np.array(images[start : start + batch_size])), part)
                for start, part in zip(range(0, len(labels), batch_size), labels.split(batch_size)))
    return zip(images.split(batch_size), labels.split(batch_size))


def batches_in_order(
    images: Images, labels: torch.Tensor, order: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches of the items ``order`` lists, in that order (repeats allowed).

    A tensor's items are gathered once per pass (one ``index_select``) and every batch is a
    view of that copy: a gather per batch would cost more than the whole step of a head
    trained on cached embeddings. An array (a memory-mapped split, maybe larger than RAM)
    is gathered one batch at a time instead, so a pass holds one batch of pixels.
    """
    if isinstance(images, np.ndarray):
        for rows in order.split(batch_size):
            yield gather_rows(images, rows.numpy()), labels.index_select(0, rows.to(labels.device))
        return
    order = order.to(images.device)
    yield from _slices(images.index_select(0, order), labels.index_select(0, order), batch_size)


def gather_rows(images: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """``images[rows]`` as a tensor, read in ascending row order and returned in the order asked.

    Reading a memory map in file order lets the kernel read ahead and merge neighbouring
    pages; the batch's shuffled order is restored in memory afterwards.
    """
    ascending = np.argsort(rows, kind="stable")
    batch = np.empty((len(rows), *images.shape[1:]), dtype=images.dtype)
    batch[ascending] = images[rows[ascending]]
    return torch.from_numpy(batch)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; one already there is returned as it is.

    ``Tensor.to`` returns the same tensor too, but parses its arguments first: checking the
    device is 5x cheaper, per batch of the head trained on cached embeddings.
    """
    return tensor if tensor.device == device else tensor.to(device, non_blocking=True)


def _is_pixels(batch: torch.Tensor) -> bool:
    """Whether ``batch`` holds stored uint8 pixels, which :func:`to_input` converts; anything else is a model input."""
    return batch.dtype == torch.uint8


def to_input(batch: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """uint8 (B, H, W) → float (B, 1, H, W) in [0, 1] on ``device``; other tensors are just moved."""
    batch = to_device(batch, device)
    if _is_pixels(batch):
        batch = batch.unsqueeze(1).float().div_(255).contiguous(memory_format=memory_format)
    return batch


def model_batches(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
    transform: BatchTransform | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` as the model takes them: inputs through :func:`to_input` and ``transform``, labels on ``device``.

    A pass's batches are cut from one split, so its first batch tells whether any of them needs
    work. Cached embeddings already on the device pass through untouched: a step of the head
    trained on them is so short that per-batch checks would show in its epoch time.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return iter(())
    batches = itertools.chain([first], batches)
    images, labels = first
    if transform is None and not _is_pixels(images) and images.device == device and labels.device == device:
        return batches
    if device.type == "cuda" and images.device.type == "cpu":
        batches = prefetched(batches, device)
    return _converted(batches, device, memory_format, transform)


def prefetched(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` copied to ``device`` one ahead: batch i+1's pinned copy runs while batch i computes."""
    pending = None
    for images, labels in batches:
        moved = (images.pin_memory().to(device, non_blocking=True), labels.pin_memory().to(device, non_blocking=True))
        if pending is not None:
            yield pending
        pending = moved
    if pending is not None:
        yield pending


def _converted(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    memory_format: torch.memory_format,
    transform: BatchTransform | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in batches:
        x = to_input(images, device, memory_format)
        if transform is not None:
            x = transform(x)
        yield x, to_device(labels, device)


def _with_progress(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], total: int, desc: str, enabled: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` counted in images on a tqdm bar; without the bar, untouched (no per-step call)."""
    return _counted(batches, total, desc) if enabled else batches


def _counted(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], total: int, desc: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    with tqdm(total=total, desc=desc, unit="img", leave=False, mininterval=1.0, dynamic_ncols=True) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch[1]))


def train_one_epoch(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    total: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loss_fn: nn.Module,
    device: torch.device,
    amp: str = "none",
    memory_format: torch.memory_format = torch.contiguous_format,
    transform: BatchTransform | None = None,
    desc: str = "train",
    progress: bool = True,
    ema: AveragedModel | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> EpochResult:
    """Train for one pass over ``batches``; the scheduler steps, and ``ema`` averages, once per batch.

    With a ``scaler`` (fp16 training) the loss is scaled before the backward pass and the
    step is skipped when the unscaled gradients hold inf or NaN, as ``torch.amp`` prescribes.
    """
    model.train()
    tally = _Tally(loss_fn)
    for x, y in _with_progress(model_batches(batches, device, memory_format, transform), total, desc, progress):
        with autocast(device, amp):
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        tally.add(y, logits.detach())
    return tally.result()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    total: int,
    loss_fn: nn.Module,
    device: torch.device,
    amp: str = "none",
    memory_format: torch.memory_format = torch.contiguous_format,
    desc: str = "eval",
    progress: bool = True,
) -> EpochResult:
    """Loss and class probabilities over ``batches`` with the model in eval mode."""
    model.eval()
    tally = _Tally(loss_fn)
    for x, y in _with_progress(model_batches(batches, device, memory_format), total, desc, progress):
        with autocast(device, amp):
            logits = model(x)
        tally.add(y, logits)
    return tally.result()


def combine_results(parts: Sequence[EpochResult]) -> EpochResult:
    """One result for the union of several passes (e.g. every rank's shard, in rank order).

    The loss is the item-weighted mean, so it equals one pass over all the items up to rounding.
    """
    parts = [part for part in parts if len(part.labels)]
    n = sum(len(part.labels) for part in parts)
    return EpochResult(
        sum(part.loss * len(part.labels) for part in parts) / n,
        np.concatenate([part.labels for part in parts]),
        np.concatenate([part.probabilities for part in parts]),
    )
