"""Past one machine's memory: speed and peak memory of preprocess, a training pass and evaluation at 10k-100k images.

For each data set size it builds a generated set of JPEGs (a few distinct synthetic films,
hard-linked as many times as needed, so creating 100,000 files costs seconds while every one
is still decoded), then measures, each in its own process:

* ``preprocess``: :func:`~cxr.data.preprocess.preprocess_split` into a memory-mapped ``.npy``;
* ``train``: ``--steps`` steps of the custom CNN (the params' recipe, augmentation included)
  on shuffled batches gathered from the memory-mapped split, as the train stage reads it;
* ``evaluate``: the custom CNN over the whole split, as the evaluate stage reads it.

Peak memory is sampled from ``/proc/<pid>/status`` of the process and its workers, summed:
``RssAnon`` (the process's own memory, what runs a machine out of memory) and ``VmRSS``
(which also counts the memory map's file pages, page cache the kernel can drop). At the
smallest size the training pass also runs from a copy of the split in RAM (the path before
memory maps), alternating with the memory-mapped pass, for the speed comparison. Rows go to
``metrics/scale.json`` and are printed.

``python benchmarks/scale.py [--sizes 10000 50000 100000] [--image-size 224] [--steps 20] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
from PIL import Image

from cxr.console import run
from cxr.data.preprocess import preprocess_split
from cxr.params import CLASSES, load_params
from cxr.paths import METRICS

DISTINCT_FILMS = 96
FILM_SIDE = 256
SAMPLE_SECONDS = 0.05


def make_jpegs(folder: Path, images: int) -> pd.DataFrame:
    """``images`` JPEG paths in class folders, hard links to a few distinct synthetic films; the split's rows."""
    rng = np.random.default_rng(0)
    films = []
    for index in range(DISTINCT_FILMS):
        smooth = np.cumsum(np.cumsum(rng.normal(size=(FILM_SIDE, FILM_SIDE)), 0), 1)
        pixels = (255 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint8)
        films.append(folder / f"film-{index}.jpg")
        Image.fromarray(pixels).save(films[-1], quality=90)
    rows = []
    for index in range(images):
        label = CLASSES[index % len(CLASSES)]
        path = Path(label) / f"{index:06d}.jpg"
        (folder / label).mkdir(exist_ok=True)
        os.link(films[index % DISTINCT_FILMS], folder / path)
        rows.append({"path": path.as_posix(), "label": label, "patient": f"p{index}"})
    return pd.DataFrame(rows)


def measure_preprocess(workdir: Path, image_size: int, workers: int) -> tuple[int, float]:
    frame = pd.read_csv(workdir / "rows.csv", dtype=str)
    started = time.perf_counter()
    kept, _ = preprocess_split(workdir / "jpegs", frame, image_size, workers, "train", CLASSES, workdir / "processed")
    return len(kept), time.perf_counter() - started


def _model(params: Any, device: Any) -> Any:
    from cxr.training.models import build_model
    from cxr.training.runtime import memory_format_of

    model = build_model("custom_cnn", len(CLASSES), [0.5], [0.25], width=params.train_custom.width,
                        dropout=params.train_custom.dropout)
    return model.to(device, memory_format=memory_format_of(params.train))


def measure_train(workdir: Path, steps: int, in_ram: bool) -> tuple[int, float]:
    """``steps`` timed training steps (after two untimed ones) on batches of a shuffled order over the whole split.

    torch is imported here, not at the top, so the preprocess measurement's processes hold only
    what the preprocess stage imports.
    """
    import torch
    from torch import nn

    from cxr.training.augment import training_transform
    from cxr.training.engine import batches_in_order, train_one_epoch
    from cxr.training.loop import load_tensors, make_optimizer
    from cxr.training.runtime import configure, memory_format_of

    params = load_params()
    device = configure(params.train)
    split = load_tensors(workdir / "processed", "train", list(CLASSES))
    images = torch.from_numpy(np.array(split.inputs)) if in_ram else split.inputs
    recipe = params.train_custom
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[: (steps + 2) * recipe.batch_size]
    model = _model(params, device)
    optimizer = make_optimizer(recipe, list(model.parameters()))
    transform = training_transform(recipe, torch.Generator().manual_seed(0), pixels=True)

    def steps_over(part: torch.Tensor) -> None:
        train_one_epoch(model, batches_in_order(images, split.labels, part, recipe.batch_size), len(part), optimizer,
                        None, nn.CrossEntropyLoss(), device, params.train.amp, memory_format_of(params.train),
                        transform, progress=False)

    steps_over(order[: 2 * recipe.batch_size])
    started = time.perf_counter()
    steps_over(order[2 * recipe.batch_size :])
    return len(order) - 2 * recipe.batch_size, time.perf_counter() - started


def measure_evaluate(workdir: Path) -> tuple[int, float]:
    """The whole split through the model in evaluation batches (torch imported here, as for training)."""
    from torch import nn

    from cxr.training.engine import evaluate, iterate_batches
    from cxr.training.loop import load_tensors
    from cxr.training.runtime import configure, memory_format_of

    params = load_params()
    device = configure(params.train)
    split = load_tensors(workdir / "processed", "train", list(CLASSES))
    model = _model(params, device)
    started = time.perf_counter()
    evaluate(model, iterate_batches(split.inputs, split.labels, params.evaluate.batch_size), len(split),
             nn.CrossEntropyLoss(), device, memory_format=memory_format_of(params.train), progress=False)
    return len(split), time.perf_counter() - started


def _kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def sampled_run(command: list[str]) -> dict[str, Any]:
    """Run ``command``; its JSON stdout, wall time and the peak summed RssAnon / VmRSS of it and its children."""
    peaks = {"RssAnon": 0, "VmRSS": 0}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                pids = [process.pid, *(child.pid for child in root.children(recursive=True))]
            except psutil.NoSuchProcess:
                break
            for field in peaks:
                peaks[field] = max(peaks[field], sum(_kb(pid, field) for pid in pids))
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"scale benchmark step failed ({process.returncode}): {' '.join(command)}")
    return {**json.loads(output.strip().splitlines()[-1]), "peak_anon_mb": round(peaks["RssAnon"] / 1024, 1),
            "peak_rss_mb": round(peaks["VmRSS"] / 1024, 1)}


def _step(stage: str, workdir: Path, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--measure", stage, "--workdir", str(workdir),
               "--image-size", str(args.image_size), "--steps", str(args.steps), "--workers", str(args.workers), *extra]
    result = sampled_run(command)
    rate = result["images"] / result["seconds"]
    return {"stage": stage, "images": result["images"], "images_per_s": round(rate, 1),
            "peak_anon_mb": result["peak_anon_mb"], "peak_rss_mb": result["peak_rss_mb"]}


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated measurements, with the highest peaks any of them reached."""
    best = dict(max(rows, key=lambda row: row["images_per_s"]))
    best.update({key: max(row[key] for row in rows) for key in ("peak_anon_mb", "peak_rss_mb")})
    return best


def measure_size(images: int, args: argparse.Namespace, root: Path) -> tuple[list[dict[str, Any]], dict | None]:
    """The three stages' rows at one size; at the smallest, also the in-RAM training row.

    There the memory-mapped and in-RAM training passes alternate for ``--rounds`` rounds and
    each keeps its fastest, so load from other processes does not favour either.
    """
    workdir = root / f"n{images}"
    (workdir / "jpegs").mkdir(parents=True)
    make_jpegs(workdir / "jpegs", images).to_csv(workdir / "rows.csv", index=False)
    rows = [_step("preprocess", workdir, args)]
    shutil.rmtree(workdir / "jpegs")
    subprocess.run(["cat", str(workdir / "processed" / "train.npy")], stdout=subprocess.DEVNULL, check=True)
    compare = images == min(args.sizes)
    rounds = [(_step("train", workdir, args), _step("train", workdir, args, "--in-ram") if compare else None)
              for _ in range(args.rounds if compare else 1)]
    rows += [_best([mapped for mapped, _ in rounds]), _step("evaluate", workdir, args)]
    in_ram = _best([held for _, held in rounds]) if compare else None
    shutil.rmtree(workdir)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows, in_ram


def measure(args: argparse.Namespace) -> None:
    """Child process: run one stage and print ``{"images": n, "seconds": s}`` (the stage's own work, timed)."""
    if args.measure == "preprocess":
        images, seconds = measure_preprocess(args.workdir, args.image_size, args.workers)
    elif args.measure == "train":
        images, seconds = measure_train(args.workdir, args.steps, args.in_ram)
    else:
        images, seconds = measure_evaluate(args.workdir)
    print(json.dumps({"images": images, "seconds": seconds}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="training steps per measured pass")
    parser.add_argument("--workers", type=int, default=2, help="preprocess decoding processes")
    parser.add_argument("--rounds", type=int, default=3, help="alternating memory-map / in-RAM training rounds")
    parser.add_argument("--workdir", type=Path, help="where the generated sets go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=METRICS / "scale.json")
    parser.add_argument("--measure", choices=["preprocess", "train", "evaluate"], help=argparse.SUPPRESS)
    parser.add_argument("--in-ram", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        measure(args)
        return {}
    rows, in_ram = [], None
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for images in sorted(args.sizes):
            size_rows, size_in_ram = measure_size(images, args, Path(tmp))
            rows += size_rows
            in_ram = in_ram or size_in_ram
    report = {"image_size": args.image_size, "train_steps": args.steps, "cpus": os.cpu_count(),
              "rows": rows, "in_ram_train": in_ram}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    return report


if __name__ == "__main__":
    run(main)
