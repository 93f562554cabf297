"""Device, threads, seeds and precision: the knobs that change speed, not the experiment."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import random

import numpy as np
import torch

from cxr.errors import PipelineError
from cxr.params import RuntimeParams

AMP_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)

log = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    """``auto`` picks cuda > mps > cpu; an explicit device that is absent is an error, not a fallback."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name == "auto":
        return torch.device(next(dev for dev in ("cuda", "mps", "cpu") if available[dev]))
    if not available.get(name, False):
        raise PipelineError(f"train.device is {name!r} but no {name} device is available here; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from the params' seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for the next allocation instead of giving it back to the system.

    By default glibc maps every large block (over 32 MB, and any size it has not yet seen
    freed) afresh and unmaps it on free, so each training step page-faults its activations
    in again, which can cost a third of a CPU step (see benchmarks/README.md). Without mmap
    and trimming, freed blocks are reused, as PyTorch's
    caching allocator does on a GPU; the process keeps its peak memory until it exits.
    Returns False, changing nothing, where the C library is not glibc (macOS, musl). Cannot be
    undone for the process.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


def configure_host(runtime: RuntimeParams) -> None:
    """Apply threads and host memory reuse from params: what evaluation shares with training.

    Evaluation needs them as much as training does (its activations are as large), but not
    the seeds or the autotuned kernels that
    :func:`configure` adds.
    """
    if runtime.reuse_freed_memory and not reuse_freed_memory():
        log.info("train.reuse_freed_memory: the C library is not glibc, so its memory settings stay as they are")
    if runtime.threads > 0:
        torch.set_num_threads(runtime.threads)


def memory_format_of(runtime: RuntimeParams) -> torch.memory_format:
    """The layout of images and convolution weights that ``train.channels_last`` asks for."""
    return torch.channels_last if runtime.channels_last else torch.contiguous_format


def configure(runtime: RuntimeParams) -> torch.device:
    """Apply threads, host memory reuse, seeds and determinism from params and return the training device."""
    configure_host(runtime)
    seed_everything(runtime.seed)
    if runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    return select_device(runtime.device)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower.

    Cached: :func:`autocast` asks on every training step, and the answer cannot change.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast precision ``train.amp`` gives on ``device``, or None for full fp32.

    CUDA runs bf16 or fp16 as asked. A CPU runs bf16 only where the hardware has it (it
    doubles the custom CNN's training speed on an AVX512-BF16 CPU); fp16 on a CPU, and bf16
    on a CPU without native support, would be slower than fp32, so those run fp32.
    """
    if amp == "none":
        return None
    if device.type == "cuda":
        return AMP_DTYPE[amp]
    if device.type == "cpu" and amp == "bf16" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def describe_precision(device: torch.device, amp: str) -> str:
    """One line for the training log: what ``train.amp`` means on this device."""
    dtype = amp_dtype(device, amp)
    if dtype is not None:
        return f"mixed precision {str(dtype).removeprefix('torch.')} on {device.type}"
    reason = "" if amp == "none" else f" (train.amp={amp} has no native support on {device.type})"
    return f"full fp32 on {device.type}{reason}"


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision per :func:`amp_dtype`; deterministic on CPU either way (same run, same numbers)."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
