"""Choose the ``border`` training option on validation: intact and lungs-hidden scores per option.

Trains the custom CNN once per ``train_custom.border`` option named (``keep``, ``hide``) with
the params' recipe otherwise unchanged, on the preprocessed data of a project,
then scores each model on validation and test as the shortcut audit does: intact, with the
centred lung box hidden and with everything outside it hidden (test-time augmentation as in
``evaluate.tta``), next to chance. The option is chosen on the validation rows; the test rows
are what it then scores. A model already at ``<out>/<option>/custom.pt`` is scored, not
retrained, and a killed training resumes from ``custom.resume.pt``.

``python benchmarks/shortcut_options.py --project PATH [--border keep hide] [--threads N]``
writes ``<out>/scores.json`` and prints the table as markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import get_args

from sklearn.metrics import accuracy_score, f1_score

from cxr.console import run
from cxr.data.preprocess import load_split
from cxr.evaluation.inference import load_trained_model
from cxr.evaluation.shortcut_occlusion import VIEWS, chance_scores, class_probabilities, neutral_grey, occluded
from cxr.evaluation.tta import ViewAveraged
from cxr.params import Border, Params, load_params
from cxr.training.loop import train_approach
from cxr.training.runtime import configure_host, select_device

log = logging.getLogger("shortcut_options")


def trained_model(project: Path, params: Params, border: str, out: Path) -> Path:
    """The custom CNN trained with ``border``; trained (or resumed) only when its checkpoint is missing."""
    folder = out / border
    model_path = folder / "custom.pt"
    if model_path.is_file():
        log.info("%s: scoring the existing %s", border, model_path)
        return model_path
    recipe = params.train_custom.model_copy(update={"border": border})
    train_approach("custom", params.model_copy(update={"train_custom": recipe}), project / "data" / "processed",
                   model_path, folder / "live", resume_path=folder / "custom.resume.pt", progress=False)
    return model_path


def option_scores(model_path: Path, project: Path, params: Params) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy and macro-F1 of one model per split (val, test) and view, with each split's chance."""
    classes, settings = params.data.classes, params.shortcuts
    device = select_device(params.train.device)
    model, _ = load_trained_model(model_path, classes, device)
    scored = ViewAveraged(model) if "custom" in params.evaluate.tta else model
    processed = project / "data" / "processed"
    fill = neutral_grey(load_split(processed, "train", classes)[0])
    result = {}
    for split in ("val", "test"):
        images, labels, _ = load_split(processed, split, classes)
        rows = {"chance": chance_scores(labels, len(classes))}
        for view in VIEWS:
            probabilities = class_probabilities(scored, occluded(images, view, settings.center_fraction, fill),
                                                params.evaluate.batch_size, device, desc=f"{split} {view}")
            predicted = probabilities.argmax(1)
            rows[view] = {"accuracy": round(float(accuracy_score(labels, predicted)), 4),
                          "f1_macro": round(float(f1_score(labels, predicted, average="macro")), 4)}
        result[split] = rows
    return result


def markdown(scores: dict[str, dict]) -> str:
    """One row per option and split: intact, lungs hidden, border hidden, chance."""
    lines = ["| border | split | intact acc | intact macro-F1 | lungs hidden acc | border hidden acc | chance acc |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for border, splits in scores.items():
        for split, rows in splits.items():
            lines.append(f"| {border} | {split} | {rows['intact']['accuracy']:.4f} | {rows['intact']['f1_macro']:.4f} | "
                         f"{rows['center_hidden']['accuracy']:.4f} | {rows['border_hidden']['accuracy']:.4f} | "
                         f"{rows['chance']['accuracy']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path("."), help="project root with data/processed and params.yaml")
    parser.add_argument("--border", nargs="+", default=list(get_args(Border)), choices=get_args(Border))
    parser.add_argument("--threads", type=int, help="override train.threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shortcut_options"))
    args = parser.parse_args(argv)
    params = load_params(args.project / "params.yaml")
    if args.threads is not None:
        params = params.model_copy(update={"train": params.train.model_copy(update={"threads": args.threads})})
    configure_host(params.train)
    scores = {border: option_scores(trained_model(args.project, params, border, args.out), args.project, params)
              for border in args.border}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    print(markdown(scores))
    return scores


if __name__ == "__main__":
    run(main)
