"""Training/evaluation throughput of each approach, and how close the real pipeline gets to the model's limit.

For every approach it times the exact code the train stages run (in-memory uint8 images →
``iterate_batches`` → ``to_input`` → ``augment_batch`` → ``train_one_epoch``) against a *ceiling*:
the same model, batch, threads, precision and memory format stepping (optimizer, learning-rate
schedule and weight average where the recipe has one) on random tensors already on the device. A
ratio well below 1 means time goes into the data path, not the arithmetic. Pipeline, ceiling and
evaluation are run in alternating rounds and the best round of each is kept, so background load
does not bias the ratio. Run from the project root: ``python benchmarks/bench.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from cxr.console import run
from cxr.data.images import IMAGE_SUFFIXES
from cxr.data.preprocess import iter_decoded
from cxr.params import APPROACHES, Params, load_params
from cxr.paths import METRICS, PROCESSED, RAW
from cxr.training.augment import augment_batch
from cxr.training.engine import evaluate, iterate_batches, to_input, train_one_epoch
from cxr.training.loop import (
    SplitTensors,
    compute_embeddings,
    load_tensors,
    make_ema,
    make_optimizer,
    make_scheduler,
    model_args_for,
)
from cxr.training.models import build_model
from cxr.training.runtime import autocast, configure, memory_format_of

WARMUP_STEPS = 2
SCHEDULE_STEPS = 10**9  # the learning-rate schedule's length: no benchmark outruns it, and its shape costs nothing
SYNTHETIC_JPEG_SIDE = 1024  # about the size of the data set's X-rays
CXR3_TRAIN_IMAGES = 6927  # a training epoch of cxr3 (109 batches of 64): the cached head's pass on synthetic data
CEILING_POOL_BYTES = 256 * 2**20  # distinct random batches the ceiling cycles: 20 of the custom CNN's at 224 px
Run = Callable[[int], int]  # runs n steps, returns the number of images processed


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Run, steps: int, device: torch.device) -> tuple[int, float]:
    """Images processed by ``run(steps)`` and the seconds it took."""
    sync(device)
    started = time.perf_counter()
    images = run(steps)
    sync(device)
    return images, time.perf_counter() - started


def best_rates(runs: dict[str, Run], steps: int, repeats: int, device: torch.device, min_seconds: float = 0.0,
               min_total: float = 0.0) -> tuple[dict[str, float], int, int]:
    """Images/s of each run (best of alternating rounds after a warm-up), the steps per round and the rounds.

    Every round runs the same number of steps: ``steps``, or more when the slowest run would
    take under ``min_seconds``. A round of a few milliseconds (20 steps of the head on cached
    embeddings) mostly times the once-per-call setup, which the train stage pays once an
    epoch, and the timer's own noise. There are ``repeats`` rounds, or more when the slowest
    run's rounds would add up to less than ``min_total`` seconds: a best of three 1-second
    rounds is a small sample of a shared machine's load (the head's ratio spread over
    0.912-0.956 in six runs with 3 rounds, 0.914-0.935 with 10), while an image model's
    10-second rounds are long enough as they are.
    """
    for warm_up in runs.values():
        warm_up(WARMUP_STEPS)
    slowest = max(timed(step, steps, device)[1] for step in runs.values())
    round_steps = max(steps, math.ceil(steps * min_seconds / max(slowest, 1e-9)))
    rounds = max(repeats, math.ceil(min_total / max(slowest * round_steps / steps, 1e-9)))
    rates = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, step in runs.items():
            images, seconds = timed(step, round_steps, device)
            rates[name] = max(rates[name], images / seconds)
    return rates, round_steps, rounds


def endless_batches(split: SplitTensors, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled epochs back to back, as the train stage draws them."""
    order = torch.Generator().manual_seed(seed)
    while True:
        yield from iterate_batches(split.inputs, split.labels, batch_size, order)


def repeat_to(split: SplitTensors, count: int) -> SplitTensors:
    """``split``'s items repeated, in order, up to ``count`` items.

    The cached head then trains on passes as long as a real epoch, from a sample that was
    cheap to embed: its once-per-pass costs (shuffle, gather, bookkeeping) are spread over
    a pass's steps, and a 20-batch pass would charge them 5 times as much per step as a
    109-batch cxr3 epoch does. What the head computes does not depend on the values.
    """
    reps = math.ceil(count / len(split))
    inputs = split.inputs.repeat(reps, *[1] * (split.inputs.dim() - 1))
    return SplitTensors(inputs[:count], split.labels.repeat(reps)[:count])


def training_images(size: int, count: int, classes: list[str], synthetic: bool) -> tuple[SplitTensors, str]:
    """The preprocessed train split when it exists at this size, else random uint8 images."""
    path = PROCESSED / "train.npy"
    if not synthetic and path.exists() and np.load(path, mmap_mode="r").shape[1:] == (size, size):
        mapped = load_tensors(PROCESSED, "train", classes)
        return SplitTensors(torch.from_numpy(np.array(mapped.inputs)), mapped.labels), str(path)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, size, size), dtype=torch.uint8, generator=generator)
    return SplitTensors(images, torch.randint(0, 3, (count,), generator=generator)), "synthetic"


class Bench:
    """The runs of one model, sharing its optimizer, loss and runtime settings."""

    def __init__(self, params: Params, approach: str, model: nn.Module, device: torch.device) -> None:
        self.approach, self.recipe, self.runtime = approach, params.approach(approach), params.train
        self.device, self.model = device, model
        self.memory_format = memory_format_of(self.runtime)
        self.eval_batch = params.evaluate.batch_size
        self.optimizer = make_optimizer(self.recipe, [p for p in model.parameters() if p.requires_grad])
        self.scheduler = make_scheduler(self.recipe, self.optimizer, SCHEDULE_STEPS // self.recipe.epochs)
        self.ema = make_ema(model, self.recipe.ema_decay)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=self.recipe.label_smoothing)
        self.common = {"device": device, "amp": self.runtime.amp, "memory_format": self.memory_format, "progress": False}

    def pipeline(self, data: SplitTensors, augment: bool) -> Run:
        """``train_one_epoch`` on shuffled passes over ``data``, each call at most a pass's worth of steps.

        The train stage calls it once per epoch; one call over a whole round would let its
        bookkeeping grow to thousands of batches for the head on cached embeddings. Calls
        need not start where a pass starts (the warm-up shifts them); the cost is the same.
        """
        batch_size = self.recipe.batch_size
        batches, pass_steps = endless_batches(data, batch_size, self.runtime.seed), math.ceil(len(data) / batch_size)
        aug_params, rng = self.recipe.augment.model_copy(update={"enabled": True}), torch.Generator().manual_seed(1)
        transform = (lambda x: augment_batch(x, aug_params, rng)) if augment else None

        def run(n: int) -> int:
            images = 0
            for start in range(0, n, pass_steps):
                steps = min(pass_steps, n - start)
                images += len(train_one_epoch(
                    self.model, itertools.islice(batches, steps), steps * batch_size, self.optimizer, self.scheduler,
                    self.loss_fn, transform=transform, ema=self.ema, **self.common).labels)
            return images
        return run

    def ceiling(self, data: torch.Tensor) -> Run:
        """Forward/backward/optimizer, scheduler and weight-average step on random batches already on the device.

        The batches have the shape, dtype and memory format :func:`to_input` gives a batch of
        ``data`` (float 1 x H x W images, embeddings as they are). They are as many as a pass over ``data`` has
        (at most ``CEILING_POOL_BYTES`` of them), cycled: the pipeline reads a pass's worth of
        distinct data too. A pool small enough to stay in the CPU caches would time a step the
        pipeline cannot take (the head on cached embeddings steps measurably faster on a pool
        that fits in cache than on a pass's worth of batches).
        """
        batch_size = self.recipe.batch_size
        template = to_input(data[:batch_size], self.device, self.memory_format)
        batch_bytes = template.nelement() * template.element_size()
        pool = min(math.ceil(len(data) / batch_size), max(1, CEILING_POOL_BYTES // batch_bytes))
        xs = [torch.rand_like(template) for _ in range(pool)]
        y = torch.randint(0, 3, (batch_size,), device=self.device)
        batches = itertools.cycle(xs)

        def run(n: int) -> int:
            self.model.train()
            for x in itertools.islice(batches, n):
                with autocast(self.device, self.runtime.amp):
                    loss = self.loss_fn(self.model(x), y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
            return n * len(y)
        return run

    def evaluation(self, data: SplitTensors) -> Run:
        """Evaluates as many images as ``n`` training steps see, in eval-size batches."""
        batches = endless_batches(data, self.eval_batch, self.runtime.seed)
        return lambda n: len(evaluate(
            self.model, itertools.islice(batches, math.ceil(n * self.recipe.batch_size / self.eval_batch)),
            n * self.recipe.batch_size, nn.CrossEntropyLoss(), **self.common).labels)


def measure(bench: Bench, path: str, data: SplitTensors, augment: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Pipeline, ceiling and evaluation of one model on ``data``, in alternating rounds."""
    runs = {"pipeline": bench.pipeline(data, augment),
            "ceiling": bench.ceiling(data.inputs),
            "eval": bench.evaluation(data)}
    rates, steps, rounds = best_rates(runs, args.steps, args.repeats, bench.device, args.min_seconds, args.min_total)
    return {"approach": bench.approach, "batch_size": bench.recipe.batch_size, "path": path, "steps": steps,
            "rounds": rounds, **rates}


def bench_approach(params: Params, approach: str, data: SplitTensors, device: torch.device, args: argparse.Namespace,
                   epoch_images: int) -> list[dict[str, Any]]:
    """One row per measured path (extract has three: cached head, embedding computation, frozen body).

    The cached head's passes hold ``epoch_images`` embeddings, as a train stage epoch does.
    """
    # Pipeline and ceiling both step the optimizer, the learning-rate schedule and any weight average.
    recipe = params.approach(approach)
    memory_format = memory_format_of(params.train)
    model_args = model_args_for(approach, recipe, data.inputs, len(params.data.classes))
    model = build_model(**model_args).to(device, memory_format=memory_format)
    step_model = torch.compile(model) if params.train.compile else model
    if approach != "extract":
        path = "images → augment → step" if recipe.augment.enabled else "images → step"
        bench = Bench(params, approach, step_model, device)
        return [measure(bench, path, data, recipe.augment.enabled, args)]
    model.freeze_body()
    frozen = Bench(params, approach, step_model, device)
    body_row = measure(frozen, "frozen body every batch (augment on)", data, True, args)
    count = args.steps * recipe.batch_size
    sample = SplitTensors(data.inputs[:count], data.labels[:count])
    amp = params.train.amp
    embeddings = compute_embeddings(model, sample, frozen.eval_batch, device, memory_format, amp)
    head_row = measure(Bench(params, approach, model.head, device), "cached: head on embeddings",
                       repeat_to(embeddings, epoch_images), False, args)
    embed = {"embed": lambda n: len(compute_embeddings(
        model, SplitTensors(sample.inputs[: n * recipe.batch_size], sample.labels[: n * recipe.batch_size]),
        frozen.eval_batch, device, memory_format, amp))}
    rates, steps, rounds = best_rates(embed, args.steps, args.repeats, device, args.min_seconds, args.min_total)
    embed_row = {"approach": approach, "batch_size": frozen.eval_batch, "path": "cached: embed once per split",
                 "steps": steps, "rounds": rounds, "pipeline": rates["embed"]}
    return [head_row, embed_row, body_row]


def decode_rate(size: int, count: int, workers: int, synthetic: bool) -> dict[str, Any]:
    """Decoding images/s over the raw data's first ``count`` images, or synthetic JPEGs.

    Every split's decode first starts its worker processes (each imports numpy, PIL and pydicom),
    a fixed cost that dominates a few hundred files; so the row gives it apart (``startup_s``: one
    image per worker) from the steady-state rate (``steady``: the second half of the files) beside
    the end-to-end rate (``pipeline``).
    """
    files = [] if synthetic or not RAW.exists() else sorted(
        p for p in RAW.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:count]
    with tempfile.TemporaryDirectory() as tmp:
        source = str(RAW)
        if not files:
            source = f"synthetic {SYNTHETIC_JPEG_SIDE}px JPEG"
            ramp = np.add.outer(np.arange(SYNTHETIC_JPEG_SIDE), np.arange(SYNTHETIC_JPEG_SIDE)) // 8
            for i in range(count):
                files.append(Path(tmp) / f"{i}.jpg")
                Image.fromarray(((ramp + 13 * i) % 256).astype(np.uint8)).save(files[-1], quality=90)
        started = time.perf_counter()
        list(iter_decoded(files[:1] * workers, size, workers))
        startup = time.perf_counter() - started
        arrivals = []
        started = time.perf_counter()
        for _ in iter_decoded(files, size, workers):
            arrivals.append(time.perf_counter())
    half = len(arrivals) // 2
    steady = (len(arrivals) - half) / (arrivals[-1] - arrivals[half - 1]) if half and arrivals[-1] > arrivals[half - 1] \
        else None
    return {"approach": "preprocess", "batch_size": None, "path": f"decode {len(files)} {source}, {workers} workers",
            "pipeline": len(files) / (arrivals[-1] - started), "steady": steady, "startup_s": startup,
            "files": len(files), "workers": workers}


def print_table(header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        if isinstance(value, float):
            return f"{value:.3f}" if column == "ratio" else f"{value:,.1f}"
        return "-" if value is None else str(value)

    print("  ".join(f"{k}={v}" for k, v in header.items()))
    columns = ["approach", "path", "batch_size", "steps", "rounds", "pipeline", "ceiling", "ratio", "eval"]
    titles = ["approach", "path", "batch", "steps/round", "rounds", "pipeline img/s", "ceiling img/s", "ratio",
              "eval img/s"]
    table = [titles] + [[cell(row, c) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))
    print("pipeline = train_one_epoch on in-memory uint8 images (or cached embeddings); ceiling = same model and batch "
          "stepping on a pass's worth of random on-device batches; 'cached: embed' runs once per split, not per epoch")
    for row in rows:
        if "startup_s" in row:
            steady = "-" if row["steady"] is None else f"{row['steady']:,.1f} img/s"
            print(f"preprocess: worker start-up {row['startup_s']:.2f} s (once per split); steady-state decoding {steady}; "
                  f"end-to-end {row['pipeline']:,.1f} img/s over {row['files']} files")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table and write the JSON report; returns the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--approaches", nargs="+", choices=APPROACHES, default=list(APPROACHES))
    parser.add_argument("--steps", type=positive, default=20, help="timed training steps per round")
    parser.add_argument("--repeats", type=positive, default=3, help="alternating rounds; the best is kept")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="more steps per round when --steps would take less than this")
    parser.add_argument("--min-total", type=float, default=10.0,
                        help="more rounds when --repeats rounds of the slowest run would take less than this (seconds)")
    parser.add_argument("--image-size", type=positive, help="default: preprocess.image_size")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=METRICS / "bench.json")
    parser.add_argument("--decode-files", type=positive, default=200)
    parser.add_argument("--synthetic", action="store_true", help="ignore data/processed and data/raw")
    parser.add_argument("--epoch-images", type=positive, help="embeddings per pass of the cached head (default: the "
                        f"train split's size, or {CXR3_TRAIN_IMAGES:,} as in cxr3 on synthetic data)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    device = configure(params.train)
    size = args.image_size or params.preprocess.image_size
    batch = max(params.approach(a).batch_size for a in args.approaches)
    data, source = training_images(size, args.steps * batch, list(params.data.classes), args.synthetic)
    epoch_images = args.epoch_images or (CXR3_TRAIN_IMAGES if source == "synthetic" else len(data))
    header = {"torch": torch.__version__, "device": device_name(device), "threads": torch.get_num_threads(),
              "image_size": size, "data": source, "steps": args.steps, "min_seconds": args.min_seconds,
              "repeats": args.repeats, "min_total": args.min_total, "eval_batch_size": params.evaluate.batch_size,
              "head_epoch": epoch_images}
    rows = [row for approach in args.approaches
            for row in bench_approach(params, approach, data, device, args, epoch_images)]
    rows.append(decode_rate(size, args.decode_files, params.preprocess.workers, args.synthetic))
    for row in rows:
        if row.get("ceiling"):
            row["ratio"] = row["pipeline"] / row["ceiling"]
    print_table(header, rows)
    report = {**header, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


if __name__ == "__main__":
    run(main)
