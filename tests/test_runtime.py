"""Runtime knobs: which precision ``train.amp`` gives on each device, and that it is used; host memory reuse."""

import ctypes
import logging
import resource
import sys

import pytest
import torch

from cxr.params import RuntimeParams
from cxr.training import runtime
from cxr.training.runtime import (
    amp_dtype,
    autocast,
    configure,
    configure_host,
    describe_precision,
    memory_format_of,
    reuse_freed_memory,
)

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


def _faults_of_a_fresh_64mb_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MB, written once and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_reused_memory_takes_no_new_pages_once_large_tensors_recur():
    assert reuse_freed_memory()
    faults = [_faults_of_a_fresh_64mb_tensor() for _ in range(12)]  # the heap settles within a few
    assert sum(faults[-4:]) < 1000, faults  # glibc's default maps each one afresh: 4 x 16,384 faults


def test_configure_reuses_memory_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda: calls.append(1) or True)
    configure(RuntimeParams(threads=1, reuse_freed_memory=False))
    assert calls == []
    configure(RuntimeParams(threads=1))
    assert calls == [1]


def test_evaluation_gets_threads_memory_reuse_and_layout_but_keeps_its_random_state(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda: calls.append(1) or True)
    threads = torch.get_num_threads()
    torch.manual_seed(7)
    try:
        configure_host(RuntimeParams(threads=1, seed=42))
        assert calls == [1] and torch.get_num_threads() == 1
        assert torch.initial_seed() == 7
    finally:
        torch.set_num_threads(threads)
    assert memory_format_of(RuntimeParams(channels_last=True)) == torch.channels_last
    assert memory_format_of(RuntimeParams(channels_last=False)) == torch.contiguous_format


def test_without_glibc_memory_settings_are_left_alone_and_said_so(monkeypatch, caplog):
    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert reuse_freed_memory() is False
    with caplog.at_level(logging.INFO, logger="cxr.training.runtime"):
        configure(RuntimeParams(threads=1))
    assert "not glibc" in caplog.text
