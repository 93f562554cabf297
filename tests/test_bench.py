"""Smoke test of benchmarks/bench.py: it runs end to end and reports every approach (no timing checks)."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cxr.training.engine import EpochResult

from conftest import write_processed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """One torch thread: the shared 2-core machine makes multi-threaded tiny steps slow, not wrong."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
def test_bench_reports_every_approach_with_positive_rates(bench, one_thread, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--image-size", "32", "--steps", "2", "--repeats", "1", "--min-seconds", "0", "--decode-files", "3",
            "--synthetic", "--params", str(ROOT / "params.yaml"), "--out", str(out)]
    returned = bench.main(argv)

    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned, ensure_ascii=False))
    assert report["image_size"] == 32 and report["data"] == "synthetic"
    rows = report["rows"]
    assert {row["approach"] for row in rows} == {"custom", "extract", "finetune", "preprocess"}
    assert {row["path"] for row in rows if row["approach"] == "extract"} == {
        "cached: head on embeddings", "cached: embed once per split", "frozen body every batch (augment on)"}
    for row in rows:
        rates = [row[key] for key in ("pipeline", "ceiling", "eval", "ratio") if key in row]
        assert rates and all(rate > 0 for rate in rates), row
    trained = [row for row in rows if "ceiling" in row]
    assert len(trained) == 4 and all({"pipeline", "ceiling", "eval", "ratio"} <= row.keys() for row in trained)
    decode = next(row for row in rows if row["approach"] == "preprocess")
    assert decode["files"] == 3 and decode["startup_s"] > 0 and decode["steady"] > 0
    printed = capsys.readouterr().out
    assert "ceiling img/s" in printed
    assert f"preprocess: worker start-up {decode['startup_s']:.2f} s (once per split)" in printed


def test_rounds_run_the_same_steps_stretched_to_min_seconds(bench, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    calls = {"fast": [], "slow": []}

    def fake_run(name, seconds_per_step):
        def run(n):
            calls[name].append(n)
            clock[0] += n * seconds_per_step
            return 4 * n
        return run

    runs = {"fast": fake_run("fast", 0.001), "slow": fake_run("slow", 0.002)}
    rates, steps, rounds = bench.best_rates(runs, steps=10, repeats=2, device=torch.device("cpu"), min_seconds=0.5)

    assert (steps, rounds) == (250, 2)  # the slow run's 10 steps take 0.02 s: 25 times as many fill 0.5 s
    assert calls == {"fast": [bench.WARMUP_STEPS, 10, 250, 250], "slow": [bench.WARMUP_STEPS, 10, 250, 250]}
    assert rates == {"fast": pytest.approx(4000), "slow": pytest.approx(2000)}
    assert bench.best_rates(runs, steps=10, repeats=1, device=torch.device("cpu"))[1:] == (10, 1)


def test_short_rounds_are_repeated_until_the_slowest_run_has_min_total_seconds(bench, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def run(n):
        clock[0] += n * 0.01
        return n

    rates, steps, rounds = bench.best_rates({"only": run}, steps=10, repeats=2, device=torch.device("cpu"),
                                            min_seconds=0.5, min_total=1.8)
    assert (steps, rounds) == (50, 4)  # 0.5-second rounds: 4 of them reach 1.8 s
    assert bench.best_rates({"only": run}, steps=10, repeats=3, device=torch.device("cpu"), min_total=0.2)[2] == 3


def test_the_ceiling_cycles_a_pass_worth_of_distinct_batches_within_its_memory_cap(bench, one_thread, monkeypatch):
    params = bench.load_params(ROOT / "params.yaml")
    head = torch.nn.Linear(512, 3)
    ceiling = bench.Bench(params, "extract", head, torch.device("cpu")).ceiling(torch.zeros(6927, 512))
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].data_ptr()))

    assert ceiling(2 * 109) == 2 * 109 * 64
    assert len(set(seen)) == 109 and seen[:109] == seen[109:]  # a pass of 6,927 items has 109 batches of 64
    monkeypatch.setattr(bench, "CEILING_POOL_BYTES", 3 * 64 * 512 * 4)
    bench.Bench(params, "extract", head, torch.device("cpu")).ceiling(torch.zeros(6927, 512))(7)
    assert len(set(seen[2 * 109:])) == 3


def test_the_pipeline_calls_train_one_epoch_once_per_pass_at_most(bench, monkeypatch):
    calls = []

    def fake_train_one_epoch(model, batches, total, *args, **kwargs):
        labels = [y for _, y in batches]
        calls.append(len(labels))
        return EpochResult(0.0, torch.cat(labels).numpy(), torch.zeros(0).numpy())

    monkeypatch.setattr(bench, "train_one_epoch", fake_train_one_epoch)
    params = bench.load_params(ROOT / "params.yaml")
    model = bench.build_model("custom_cnn", 3, [0.5], [0.2], width=4)
    images = 310  # passes of 5 batches (params' batch size 64), the last one 54 images
    data = bench.SplitTensors(torch.zeros(images, 8, 8, dtype=torch.uint8), torch.zeros(images, dtype=torch.long))
    run = bench.Bench(params, "custom", model, torch.device("cpu")).pipeline(data, augment=False)

    assert run(12) == 310 + 310 + 2 * 64
    assert calls == [5, 5, 2]


def test_extract_cache_gives_the_same_model_as_the_frozen_body_path(one_thread, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("extract_cache", ROOT / "benchmarks" / "extract_cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    write_processed(tmp_path / "data" / "processed", {"train": 6, "val": 3, "test": 3})
    monkeypatch.chdir(tmp_path)
    report = module.main(["--epochs", "2", "--weights", "none", "--params", str(ROOT / "params.yaml"),
                          "--out", str(tmp_path / "cache.json")])
    cached, full = report["cached"], report["frozen_body_every_epoch"]
    assert cached["best_epoch"] == full["best_epoch"]
    assert cached["f1_macro"] == pytest.approx(full["f1_macro"], abs=0.005)
    assert report["speedup"] > 0


def test_repeat_to_tiles_the_items_in_order_up_to_the_count(bench):
    split = bench.SplitTensors(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 2]))
    tiled = bench.repeat_to(split, 7)

    assert tiled.labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert tiled.inputs.tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5], [0, 1]]


def test_the_cached_head_trains_on_passes_as_long_as_an_epoch(bench, one_thread, monkeypatch):
    measured = {}

    def fake_measure(b, path, data, augment, args):
        measured[path] = len(data)
        return {"path": path}

    monkeypatch.setattr(bench, "measure", fake_measure)
    params = bench.load_params(ROOT / "params.yaml")
    data, _ = bench.training_images(32, 2 * 64, list(params.data.classes), synthetic=True)
    args = argparse.Namespace(steps=2, repeats=1, min_seconds=0.0, min_total=0.0)
    bench.bench_approach(params, "extract", data, torch.device("cpu"), args, epoch_images=300)

    assert measured == {"frozen body every batch (augment on)": 128, "cached: head on embeddings": 300}
