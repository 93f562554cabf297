"""Feature extraction with and without the embedding cache: wall time and test scores.

Trains ``train_extract`` twice on the preprocessed data (``data/processed``, from ``dvc repro
preprocess``) with the params' recipe: once on embeddings computed once per split, once running
the frozen body on every batch of every epoch. Both runs see the same batches in the same
order, so they should give the same model; the script prints both wall times, the speedup and
the test scores of each. Run from the project root:
``python benchmarks/extract_cache.py [--epochs N] [--weights none]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cxr.console import run
from cxr.evaluation.inference import load_trained_model, predict_split
from cxr.params import load_params
from cxr.paths import METRICS, PROCESSED
from cxr.reporting.scores import classification_metrics
from cxr.training.loop import train_approach
from cxr.training.runtime import select_device


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, help="override train_extract.epochs")
    parser.add_argument("--weights", help="override train_extract.weights (e.g. none offline)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=str(METRICS / "extract_cache.json"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    overrides = {k: v for k, v in {"epochs": args.epochs, "weights": args.weights}.items() if v is not None}
    augment = params.train_extract.augment.model_copy(update={"enabled": False})
    recipe = params.train_extract.model_copy(update={"augment": augment, **overrides})
    device = select_device(params.train.device)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cached in (True, False):
            variant = params.model_copy(update={"train_extract": recipe.model_copy(update={"cache_embeddings": cached})})
            model_path = Path(tmp) / f"extract-{cached}.pt"
            started = time.perf_counter()
            summary = train_approach("extract", variant, PROCESSED, model_path, Path(tmp) / f"live-{cached}",
                                     progress=False)
            seconds = time.perf_counter() - started
            model, checkpoint = load_trained_model(model_path, params.data.classes, device)
            test = predict_split(model, checkpoint, PROCESSED, "test", params.data.classes,
                                 params.evaluate.batch_size, device).table
            scores = classification_metrics(test["label"], test["predicted"], params.data.classes)
            results["cached" if cached else "frozen_body_every_epoch"] = {
                "seconds": round(seconds, 2), "best_epoch": summary["epoch"],
                **{k: scores[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")},
            }
    report = {"epochs": recipe.epochs, "weights": recipe.weights,
              "speedup": round(results["frozen_body_every_epoch"]["seconds"] / results["cached"]["seconds"], 2),
              **results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name in ("cached", "frozen_body_every_epoch"):
        row = results[name]
        print(f"{name:<24} {row['seconds']:>8.1f} s  acc {row['accuracy']:.4f}  macro-F1 {row['f1_macro']:.4f}")
    print(f"speedup {report['speedup']}x over {recipe.epochs} epochs")
    return report


if __name__ == "__main__":
    run(main)
