"""Data-parallel training under ``torchrun``: one process per device, gradients averaged by DDP.

Any training stage runs data-parallel when launched through torchrun instead of python::

    torchrun --nproc_per_node=2 stages/train.py custom    # 2 GPUs (nccl), or 2 CPU processes (gloo)
    torchrun --nproc_per_node=2 stages/train.py finetune

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with ``WORLD_SIZE`` above 1 training
joins a process group (nccl on CUDA, gloo otherwise) and CUDA process k uses GPU ``LOCAL_RANK``.
Without torchrun, or with a single process, nothing here has any effect: no process group
exists and training is the single-process run, number for number.

The helpers below answer for the current process group and degrade to the single-process
answer (rank 0 of 1) when there is none, so callers need no branches of their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from cxr.errors import PipelineError

T = TypeVar("T")


def launched_world_size() -> int:
    """How many processes torchrun started for this run (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    """Whether this process belongs to an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 logs and writes every output; the other ranks only compute."""
    return rank() == 0


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, CUDA process k trains on GPU ``LOCAL_RANK``; other devices are kept as they are."""
    if launched_world_size() <= 1 or device.type != "cuda":
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    return local


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the duration of the block, then leave it.

    Does nothing outside torchrun (or with one process), or when the caller already
    initialised a group. On a normal exit every rank waits for the others, so no rank
    leaves while rank 0 is still writing outputs.
    """
    if launched_world_size() <= 1 or active():
        yield
        return
    if device.type not in ("cuda", "cpu"):
        raise PipelineError(f"distributed training runs on cuda or cpu, not {device.type}; set train.device accordingly")
    dist.init_process_group(backend_for(device), device_id=device if device.type == "cuda" else None)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def quiet_other_ranks() -> None:
    """Keep only warnings and errors on ranks other than 0, for the rest of the process.

    Every rank computes the same metrics, so their log lines would be copies of rank 0's;
    the setting outlives the process group so the stage script's closing line is printed once too.
    """
    if not is_main():
        logging.disable(logging.INFO)


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` inside DistributedDataParallel when a process group is active, else ``module`` itself."""
    if not active():
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def all_gather(value: T) -> list[T]:
    """Every rank's ``value`` in rank order, on every rank; any picklable object (arrays of any length)."""
    if not active():
        return [value]
    gathered: list[T] = [None] * world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, value)
    return gathered


@torch.no_grad()
def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP copies them only at the start of a training forward, so after an epoch's last step
    each rank holds statistics updated by its own last batch. Evaluating with rank 0's
    buffers on every rank scores exactly the weights the checkpoint saves.
    """
    if not active():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def epoch_order(length: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's shuffled share of ``range(length)`` for ``epoch``, as DistributedSampler deals it.

    Every rank gets ``ceil(length / world_size)`` indices (a few repeated when the length is
    not divisible), so all ranks run the same number of steps; the order is a function of
    the seed and the epoch alone, so a resumed run replays it without saved state.
    """
    sampler = DistributedSampler(
        range(length), num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def shard(length: int) -> slice:
    """This rank's contiguous block of ``range(length)``: the blocks in rank order cover each item once."""
    size, index = world_size(), rank()
    return slice(length * index // size, length * (index + 1) // size)


def seed_for(seed: int, stream: int, epoch: int, per_rank: bool = True) -> int:
    """A seed of its own per (stream, epoch, rank), or per (stream, epoch) shared by every rank.

    Ranks draw independent augmentations and dropout masks, and a resumed run redraws
    exactly those an uninterrupted one would have. A shared seed serves a draw every rank
    must make identically, such as a balanced epoch's order that each rank then takes its share of.
    """
    return int(np.random.SeedSequence([seed, stream, epoch, *([rank()] if per_rank else [])]).generate_state(1)[0])
