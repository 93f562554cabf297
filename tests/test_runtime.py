"""Runtime knobs: which precision ``train.amp`` gives on each device, and that it is used."""

import pytest
import torch

from cxr import runtime
from cxr.runtime import amp_dtype, autocast, describe_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(params=[True, False], ids=["native-bf16-cpu", "plain-cpu"])
def native_bf16(request, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_cuda_runs_the_precision_asked_for():
    assert amp_dtype(CUDA, "bf16") is torch.bfloat16
    assert amp_dtype(CUDA, "fp16") is torch.float16
    assert amp_dtype(CUDA, "none") is None


def test_cpu_runs_bf16_only_where_the_hardware_has_it(native_bf16):
    assert amp_dtype(CPU, "bf16") is (torch.bfloat16 if native_bf16 else None)
    assert amp_dtype(CPU, "fp16") is None
    assert amp_dtype(CPU, "none") is None


def test_the_log_line_says_why_a_cpu_runs_fp32(native_bf16):
    line = describe_precision(CPU, "bf16")
    if native_bf16:
        assert line == "mixed precision bfloat16 on cpu"
    else:
        assert line == "full fp32 on cpu (train.amp=bf16 has no native support on cpu)"
    assert describe_precision(CPU, "none") == "full fp32 on cpu"


def test_autocast_makes_a_linear_layer_compute_in_the_chosen_precision(native_bf16):
    layer, x = torch.nn.Linear(4, 2), torch.rand(3, 4)
    with autocast(CPU, "bf16"):
        out = layer(x)
    assert out.dtype is (torch.bfloat16 if native_bf16 else torch.float32)
