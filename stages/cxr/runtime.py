"""Device, threads, seeds and precision: the knobs that change speed, not the experiment."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from cxr.errors import PipelineError
from cxr.params import RuntimeParams

AMP_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def configure(runtime: RuntimeParams) -> torch.device:
    """Apply threads, seeds and determinism from params and return the training device."""
    if runtime.threads > 0:
        torch.set_num_threads(runtime.threads)
    seed_everything(runtime.seed)
    if runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    return select_device(runtime.device)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; on CPU full fp32 keeps results exactly reproducible."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=AMP_DTYPE[amp])

