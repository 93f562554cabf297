"""``cxr-predict``: classify a user's own X-ray files with a trained checkpoint.

Images go through :func:`cxr.data.images.decode_grayscale` at the checkpoint's image size and
through :func:`cxr.training.engine.to_input`, exactly like the training and evaluation stages, so a
file gets the same prediction here as it would inside the pipeline (with ``--tta`` for a model the
evaluate stage scores with test-time augmentation, ``evaluate.tta``). Files are processed in
chunks of ``--batch-size``: memory stays bounded however large the folder, and a file that
cannot be decoded is reported and skipped without stopping the others.

Usage::

    cxr-predict MODEL.pt IMAGE_OR_FOLDER [IMAGE_OR_FOLDER ...] [--json] [--gradcam OUT_DIR] [--batch-size N] [--tta]

Exit status: 0 when at least one image was predicted, 1 when none could be (or the model or
an input path is unusable), 2 for a malformed command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from cxr.console import run
from cxr.data.candidates import is_candidate_image
from cxr.data.images import IMAGE_SUFFIXES, decode_or_reason
from cxr.errors import PipelineError
from cxr.evaluation.tta import ViewAveraged
from cxr.training.engine import to_input
from cxr.training.models import load_checkpoint, model_from_checkpoint
from cxr.training.runtime import reuse_freed_memory

DEFAULT_BATCH_SIZE = 32
_MAX_DECODE_THREADS = 8
_PROBABILITY_DIGITS = 4

Failure = tuple[Path, str]


@dataclass
class PredictedChunk:
    """One chunk of input files: the decoded ones with their pixels and probabilities, and the failures."""

    paths: list[Path]
    pixels: np.ndarray
    probabilities: np.ndarray
    failures: list[Failure]


def find_images(inputs: Sequence[Path]) -> list[Path]:
    """Expand folders (recursively, sorted) into image files; files named explicitly are kept as given.

    A folder contributes the files whose suffix is in ``IMAGE_SUFFIXES``, skipping OS junk and
    anything inside hidden folders; an explicitly named file is decoded whatever its suffix.
    A file reached twice (named and inside a named folder) is predicted once.
    """
    missing = [str(path) for path in inputs if not path.exists()]
    if missing:
        raise PipelineError(f"no such file or folder: {', '.join(missing)}")
    found: dict[Path, Path] = {}
    for path in inputs:
        for image in _images_in_folder(path) if path.is_dir() else [path]:
            found.setdefault(image.resolve(), image)
    return list(found.values())


def _images_in_folder(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and is_candidate_image(path)
        and not any(part.startswith(".") for part in path.relative_to(folder).parent.parts)
    )


def iter_predictions(
    model: nn.Module, image_size: int, paths: Sequence[Path], batch_size: int = DEFAULT_BATCH_SIZE
) -> Iterator[PredictedChunk]:
    """Decode and classify ``paths`` ``batch_size`` files at a time, in input order.

    Only one chunk of pixels is held at a time; files are decoded on a few threads because
    PIL and pydicom release the GIL while decoding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    workers = max(1, min(_MAX_DECODE_THREADS, batch_size, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = [Path(path) for path in paths[start : start + batch_size]]
            decoded = list(pool.map(partial(decode_or_reason, size=image_size), chunk))
            yield _classify_chunk(model, device, image_size, chunk, decoded)


def _classify_chunk(
    model: nn.Module, device: torch.device, image_size: int, chunk: list[Path], decoded: list[np.ndarray | str]
) -> PredictedChunk:
    good = [(path, pixels) for path, pixels in zip(chunk, decoded) if isinstance(pixels, np.ndarray)]
    # The reason without the "<path>: " that starts the message: the caller prints the path itself.
    failures = [(path, reason.removeprefix(f"{path}: ")) for path, reason in zip(chunk, decoded) if isinstance(reason, str)]
    if not good:
        empty = np.empty((0, image_size, image_size), dtype=np.uint8)
        return PredictedChunk([], empty, np.empty((0, 0)), failures)
    pixels = np.stack([image for _, image in good])
    with torch.inference_mode():
        logits = model(to_input(torch.from_numpy(pixels), device, torch.contiguous_format))
        probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64)
    return PredictedChunk([path for path, _ in good], pixels, probabilities, failures)


def result_rows(chunk: PredictedChunk, classes: Sequence[str]) -> list[dict[str, Any]]:
    """One JSON-ready dict per predicted image: ``path``, ``predicted`` and per-class ``probabilities``."""
    return [
        {
            "path": str(path),
            "predicted": classes[int(np.argmax(probs))],
            "probabilities": {name: float(p) for name, p in zip(classes, probs)},
        }
        for path, probs in zip(chunk.paths, chunk.probabilities)
    ]


def predict_files(
    model: nn.Module, checkpoint: dict[str, Any], paths: Iterable[Path], batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[list[dict[str, Any]], list[Failure]]:
    """Classify image files with a loaded model; returns (results in input order, (path, reason) failures)."""
    classes, image_size = checkpoint_classes(checkpoint), checkpoint_image_size(checkpoint)
    results: list[dict[str, Any]] = []
    failures: list[Failure] = []
    for chunk in iter_predictions(model, image_size, list(paths), batch_size):
        results += result_rows(chunk, classes)
        failures += chunk.failures
    return results, failures


def checkpoint_classes(checkpoint: dict[str, Any]) -> list[str]:
    """The class names, in the order of the model's outputs (checked by :func:`load_checkpoint`)."""
    return checkpoint["classes"]


def checkpoint_image_size(checkpoint: dict[str, Any]) -> int:
    """The square input size the model was trained on (checked by :func:`load_checkpoint`)."""
    return checkpoint["image_size"]


def load_model(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint and rebuild its model in eval mode on ``device``, channels-last as training runs it.

    Channels-last convolution weights make the convolutions run channels-last (the input's one
    channel is laid out the same either way), which CPU kernels run faster in fp32.
    """
    checkpoint = load_checkpoint(path)
    return model_from_checkpoint(checkpoint, str(path)).to(device, memory_format=torch.channels_last), checkpoint


def format_table(results: Sequence[dict[str, Any]], classes: Sequence[str]) -> str:
    """An aligned text table: path, predicted class, then one probability column per class."""
    header = ["path", "predicted", *classes]
    rows = [
        [row["path"], row["predicted"], *(f"{row['probabilities'][name]:.{_PROBABILITY_DIGITS}f}" for name in classes)]
        for row in results
    ]
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    return "\n".join(_table_line(line, widths) for line in [header, *rows])


def _table_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    text_cells = [cell.ljust(width) for cell, width in zip(cells[:2], widths)]
    number_cells = [cell.rjust(width) for cell, width in zip(cells[2:], widths[2:])]
    return "  ".join(text_cells + number_cells).rstrip()


class GradcamWriter:
    """Saves ``<stem>_gradcam.png`` overlays into one folder; same-named inputs get ``<stem>_2_gradcam.png``, ..."""

    def __init__(self, out_dir: Path, model: nn.Module, batch_size: int) -> None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PipelineError(f"cannot create the Grad-CAM folder {out_dir}: {err.strerror or err}") from None
        self.out_dir, self.model, self.batch_size = out_dir, model, batch_size
        self.used_names: set[str] = set()
        self.written = 0

    def write(self, chunk: PredictedChunk) -> None:
        """Overlay the Grad-CAM of each image's predicted class on the pixels the model saw."""
        if not chunk.paths:
            return
        from cxr.evaluation.saliency import gradcam_heatmaps, overlay

        images = to_input(torch.from_numpy(chunk.pixels), torch.device("cpu"), torch.contiguous_format)
        targets = [int(index) for index in chunk.probabilities.argmax(axis=1)]
        heatmaps = gradcam_heatmaps(self.model, images, target_classes=targets, batch_size=self.batch_size)
        for path, pixels, heatmap in zip(chunk.paths, chunk.pixels, heatmaps):
            destination = self.out_dir / self._unique_name(path.stem)
            try:
                Image.fromarray(overlay(pixels, heatmap)).save(destination, format="PNG")
            except OSError as err:
                raise PipelineError(f"cannot write {destination}: {err.strerror or err}") from None
            self.written += 1

    def _unique_name(self, stem: str) -> str:
        """Case-insensitively unique, so names cannot collide on macOS or Windows file systems either."""
        name, counter = f"{stem}_gradcam.png", 1
        while name.lower() in self.used_names:
            counter += 1
            name = f"{stem}_{counter}_gradcam.png"
        self.used_names.add(name.lower())
        return name


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-predict",
        description="Classify chest X-ray images (PNG, JPEG, BMP, TIFF, DICOM) as "
        "COVID19 / NORMAL / PNEUMONIA with a checkpoint trained by this pipeline.",
    )
    parser.add_argument("model", type=Path, help="checkpoint written by a training stage (models/<approach>.pt)")
    parser.add_argument(
        "inputs", type=Path, nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders (searched recursively)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument(
        "--gradcam", type=Path, metavar="OUT_DIR", help="save a Grad-CAM overlay per image into OUT_DIR"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, help="images per chunk (default %(default)s)"
    )
    parser.add_argument(
        "--tta", action="store_true",
        help="average the probabilities over rotated and zoomed views of each image, as evaluate.tta does",
    )
    return parser


def _predict_command(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    reuse_freed_memory()
    paths = find_images(args.inputs)
    if not paths:
        suffixes, searched = ", ".join(sorted(IMAGE_SUFFIXES)), ", ".join(map(str, args.inputs))
        raise PipelineError(f"no image files ({suffixes}) found in {searched}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, checkpoint = load_model(args.model, device)
    classes = checkpoint_classes(checkpoint)
    gradcam = GradcamWriter(args.gradcam, model, args.batch_size) if args.gradcam else None
    results: list[dict[str, Any]] = []
    scored = ViewAveraged(model) if args.tta else model
    for chunk in iter_predictions(scored, checkpoint_image_size(checkpoint), paths, args.batch_size):
        for path, reason in chunk.failures:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        if gradcam is not None:
            gradcam.write(chunk)
        results += result_rows(chunk, classes)
    if not results:
        raise PipelineError(f"none of the {len(paths)} input files could be decoded; nothing was predicted")
    print(json.dumps(results, indent=2) if args.json else format_table(results, classes))
    if gradcam is not None:
        print(f"wrote {gradcam.written} Grad-CAM overlays to {args.gradcam}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``cxr-predict``); ``argv`` defaults to ``sys.argv[1:]``.

    The command reuses freed host memory as training does (``train.reuse_freed_memory``), so
    large batches do not page-fault their activations in afresh; the process keeps its peak
    memory until it exits.
    """
    run(partial(_predict_command, argv))


if __name__ == "__main__":
    main()
