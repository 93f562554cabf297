"""Choose the custom CNN's ``border`` and ``balance`` options on validation, with the worst group in view.

Trains the custom CNN once per (border, balance) pair named, with the params' recipe otherwise
unchanged (``--epochs`` shortens every run alike for an exploration), on the preprocessed data of
a project whose ``groups`` section is set. Each model is then scored on validation and test as
the pipeline scores it (test-time augmentation as in ``evaluate.tta``): overall accuracy and
macro-F1, per-group accuracy and its worst group, the focus collection's accuracy, PNEUMONIA
sensitivity, NORMAL sensitivity (films called NORMAL), pneumonia-vs-normal ROC AUC and the best
PNEUMONIA sensitivity any threshold reaches at 0.85 NORMAL specificity, with 95% bootstrap intervals,
and its misclassified films, and the accuracy with the centred lung box
hidden. Options are chosen on the validation rows; the test rows are what the chosen one then
scores.

One run per option cannot choose: the seed alone moves the validation worst group as far as an
option does. ``--seeds`` trains each option once per seed (``train.seed`` overridden, the split
unchanged), and a second table gives each option's mean and range over its seeds and applies the
rule: the best mean validation worst-group accuracy among options whose mean validation macro-F1
reaches ``F1_FLOOR``.

A model already at ``<out>/<border>-<balance>[-<epochs>]-seed<N>/custom.pt`` is scored, not
retrained, and a killed training resumes from its ``custom.resume.pt``.

``python benchmarks/training_options.py --project PATH [--border keep hide crop]
[--balance none group] [--epochs N] [--seeds N ...] [--focus GROUP]`` adds each run's scores to
``<out>/scores.json`` (runs scored by earlier or concurrent invocations stay, so seeds may train in
parallel processes into one ``--out``) and prints both tables as markdown.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd

from cxr import stats
from cxr.console import run
from cxr.data.groups import group_of, load_groups
from cxr.data.preprocess import load_split
from cxr.errors import PipelineError
from cxr.evaluation.inference import load_trained_model
from cxr.evaluation.predictions import predictions_frame
from cxr.evaluation.shortcut_occlusion import class_probabilities, neutral_grey, occluded
from cxr.evaluation.tta import ViewAveraged
from cxr.files import read_json, write_json
from cxr.params import Balance, Border, Params, load_params
from cxr.reporting.comparison import interval
from cxr.reporting.subgroups import PAIR, pneumonia_vs_normal, subgroup_report
from cxr.training.loop import train_approach
from cxr.training.runtime import configure_host, select_device

log = logging.getLogger("training_options")
NIH = "muhammedtalo/COVID-19"
TARGET_SPECIFICITY = 0.85  # issue 29's goal: NIH PNEUMONIA sensitivity >= 0.70 at NIH NORMAL specificity >= 0.85
SPLITS = ("val", "test")  # chosen on the first, reported on the second
F1_FLOOR = 0.94  # issue 29's rule: the worst group decides among options at validation macro-F1 >= 0.94


def option_label(option: dict[str, Any]) -> str:
    """An option's name: its recipe values, e.g. ``keep-none-36``."""
    return "-".join(str(value) for value in option.values())


def run_name(option: dict[str, Any], seed: int) -> str:
    """A run's folder and row name: the option's, then its seed."""
    return f"{option_label(option)}-seed{seed}"


def with_train(params: Params, **changes: Any) -> Params:
    """``params`` with ``train`` keys changed: ``seed`` changes weights, augmentation and draw order, not the split."""
    return params.model_copy(update={"train": params.train.model_copy(update=changes)})


def trained_model(project: Path, params: Params, option: dict[str, Any], folder: Path) -> Path:
    """The custom CNN trained with ``option`` (recipe keys); trained (or resumed) only when its checkpoint is missing."""
    model_path = folder / "custom.pt"
    if model_path.is_file():
        log.info("%s: scoring the existing %s", folder.name, model_path)
        return model_path
    recipe = params.train_custom.model_copy(update=option)
    train_approach("custom", params.model_copy(update={"train_custom": recipe}), project / "data" / "processed",
                   model_path, folder / "live", resume_path=folder / "custom.resume.pt", progress=False)
    return model_path


def _focus_scores(entry: dict[str, Any] | None) -> dict[str, Any]:
    """The focus collection's accuracy, PNEUMONIA and NORMAL sensitivity, pneumonia-vs-normal AUC (None if absent)."""
    if entry is None:
        return {}
    sensitivity = entry["sensitivity"]
    return {"accuracy": entry["accuracy"], "pneumonia_sensitivity": sensitivity.get("PNEUMONIA"),
            "normal_sensitivity": sensitivity.get("NORMAL"), "pneumonia_vs_normal_auc": entry["pneumonia_vs_normal_auc"]}


def best_operating_point(frame: pd.DataFrame, params: Params) -> dict[str, Any]:
    """The best PNEUMONIA sensitivity any threshold on the pneumonia-vs-normal score reaches at ``TARGET_SPECIFICITY``.

    The threshold is chosen on the very films it is scored on, so this is a ceiling, not a result:
    where even it misses the goal, no decision rule can reach it with this model's ranking.
    Empty unless ``frame`` holds both PNEUMONIA and NORMAL films (a collection in ``split.unseen_groups``
    has none on validation).
    """
    if not set(PAIR) <= set(frame["label"]):
        return {}
    truth, score = pneumonia_vs_normal(frame, list(params.data.classes))

    def best(y_true: np.ndarray, scores: np.ndarray) -> float:
        return stats.sensitivity_at_specificity(y_true == 1, scores[:, 0], TARGET_SPECIFICITY)

    return {"best_pneumonia_sensitivity_at_target": interval(truth.astype(int), score[:, None], best,
                                                             params.compare.bootstrap_resamples,
                                                             params.compare.bootstrap_seed)}


def split_scores(scored: Any, images: np.ndarray, labels: np.ndarray, paths: pd.Series, params: Params,
                 groups: pd.Series, fill: int, focus: str, device: Any) -> dict[str, Any]:
    """One split's scores: overall, worst group (groups of at least ``groups.min_images`` images), focus, lungs hidden.

    Every film is kept with its group and probabilities (``films``, the focus named in ``focus_group``), so a low
    sensitivity can be read film by film (hard films, or label noise?) and rankings and decision rules can be
    rescored without the model (how many labels would have to be wrong, an ensemble of seeds, one rule for all
    collections); its best operating point says whether a threshold could reach the goal at all
    (:func:`best_operating_point`).
    """
    classes, batch = list(params.data.classes), params.evaluate.batch_size
    probabilities = class_probabilities(scored, images, batch, device, desc="intact")
    frame = predictions_frame(paths, labels, probabilities, classes)
    report = subgroup_report({"model": frame}, groups, classes, params.compare.bootstrap_resamples,
                             params.compare.bootstrap_seed, min_images=params.grouping.min_images)["model"]
    worst = report["worst_group"]
    hidden = class_probabilities(scored, occluded(images, "center_hidden", params.shortcuts.center_fraction, fill),
                                 batch, device, desc="lungs hidden")
    predicted = probabilities.argmax(1)
    group = group_of(paths, groups).to_numpy()
    in_focus = group == focus
    return {"accuracy": stats.accuracy(labels, predicted),
            "macro_f1": stats.macro_f1(len(classes))(labels, predicted),
            "worst_group": worst, "worst_group_accuracy": report["groups"][worst]["accuracy"]["value"],
            "lungs_hidden_accuracy": stats.accuracy(labels, hidden.argmax(1)),
            "focus": _focus_scores(report["groups"].get(focus)) | best_operating_point(frame[in_focus], params),
            "focus_group": focus, "films": frame.assign(group=group).round(4).to_dict("records")}


def option_scores(model_path: Path, project: Path, params: Params, focus: str) -> dict[str, dict[str, Any]]:
    """Scores of one trained model on validation and test."""
    classes = list(params.data.classes)
    device = select_device(params.train.device)
    model, _ = load_trained_model(model_path, classes, device)
    scored = ViewAveraged(model) if "custom" in params.evaluate.tta else model
    processed = project / "data" / "processed"
    fill = neutral_grey(load_split(processed, "train", classes)[0])
    groups = load_groups(params.grouping)
    result = {}
    for split in SPLITS:
        images, labels, rows = load_split(processed, split, classes)
        result[split] = split_scores(scored, images, labels, rows["path"], params, groups, fill, focus, device)
    return result


def _ci(entry: dict[str, float] | None) -> str:
    return "-" if not entry else f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def markdown(scores: dict[str, dict[str, dict[str, Any]]], focus: str) -> str:
    """One row per option and split."""
    lines = [f"Focus collection: {focus}. Sensitivity = share of that class's films called that class.", "",
             "| option | split | acc | macro-F1 | worst group acc (group) | focus acc | focus PNEUMONIA sens | "
             f"focus NORMAL sens | focus P-vs-N AUC | focus best PNEUMONIA sens at {TARGET_SPECIFICITY} spec | "
             "lungs hidden acc |",
             "|---|---|---:|---:|---|---|---|---|---|---|---:|"]
    for name, splits in scores.items():
        for split in SPLITS:
            row, f = splits[split], splits[split]["focus"]
            lines.append(f"| {name} | {split} | {row['accuracy']:.4f} | {row['macro_f1']:.4f} | "
                         f"{row['worst_group_accuracy']:.4f} ({row['worst_group']}) | {_ci(f.get('accuracy'))} | "
                         f"{_ci(f.get('pneumonia_sensitivity'))} | {_ci(f.get('normal_sensitivity'))} | "
                         f"{_ci(f.get('pneumonia_vs_normal_auc'))} | {_ci(f.get('best_pneumonia_sensitivity_at_target'))} | "
                         f"{row['lungs_hidden_accuracy']:.4f} |")
    return "\n".join(lines)


def update_scores(path: Path, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Add one run's scores to ``path`` and return them all, under a lock and re-read first.

    Seeds trained by parallel invocations into one ``--out`` finish in any order; each keeps
    what the others wrote instead of writing back the file as it was when it started.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        scores = read_json(path) if path.is_file() else {}
        scores[name] = entry
        write_json(path, scores)
    return scores


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def _focus_spread(focus_rows: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    """The spread of one focus score over the runs that scored the focus collection (None if none did)."""
    return _spread([focus[key]["value"] for focus in focus_rows]) if focus_rows else None


def across_seeds(scores: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per option, over its seeds: validation macro-F1 and worst-group accuracy; test macro-F1, focus AUC and sensitivity."""
    runs: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    for name, splits in scores.items():
        if "option" not in splits:
            raise PipelineError(f"scores.json: {name} was scored before runs recorded their seed; rescore it")
        runs[splits["option"]].append(splits)
    summary = {}
    for option, entries in runs.items():
        test_focus = [entry["test"]["focus"] for entry in entries if entry["test"]["focus"]]
        summary[option] = {
            "seeds": sorted(entry["seed"] for entry in entries),
            "val_macro_f1": _spread([entry["val"]["macro_f1"] for entry in entries]),
            "val_worst_group_accuracy": _spread([entry["val"]["worst_group_accuracy"] for entry in entries]),
            "test_macro_f1": _spread([entry["test"]["macro_f1"] for entry in entries]),
            "test_focus_auc": _focus_spread(test_focus, "pneumonia_vs_normal_auc"),
            "test_focus_pneumonia_sensitivity": _focus_spread(test_focus, "pneumonia_sensitivity")}
    return summary


def chosen_option(summary: dict[str, dict[str, Any]]) -> str | None:
    """The option with the best mean validation worst group among those at mean validation macro-F1 >= ``F1_FLOOR``."""
    eligible = [option for option, row in summary.items() if row["val_macro_f1"]["mean"] >= F1_FLOOR]
    return max(eligible, key=lambda option: summary[option]["val_worst_group_accuracy"]["mean"], default=None)


def _range(entry: dict[str, float] | None) -> str:
    """Four decimals, so a mean just under ``F1_FLOOR`` does not print as on it."""
    return "-" if entry is None else f"{entry['mean']:.4f} [{entry['min']:.4f}, {entry['max']:.4f}]"


def seeds_markdown(summary: dict[str, dict[str, Any]], focus: str) -> str:
    """One row per option (mean [min, max] over its seeds), then the rule's choice."""
    lines = ["| option | seeds | val macro-F1 | val worst group acc | test macro-F1 | test focus P-vs-N AUC | "
             "test focus PNEUMONIA sens |",
             "|---|---|---|---|---|---|---|"]
    for option, row in summary.items():
        lines.append(f"| {option} | {', '.join(map(str, row['seeds']))} | {_range(row['val_macro_f1'])} | "
                     f"{_range(row['val_worst_group_accuracy'])} | {_range(row['test_macro_f1'])} | "
                     f"{_range(row['test_focus_auc'])} | "
                     f"{_range(row['test_focus_pneumonia_sensitivity'])} |")
    chosen = chosen_option(summary)
    best = max(summary, key=lambda option: summary[option]["val_worst_group_accuracy"]["mean"])
    verdict = (f"Chosen: {chosen}." if chosen else
               f"No option reaches the floor, so the rule chooses none; the best mean validation worst group: {best}.")
    return "\n".join([f"Mean [min, max] over each option's seeds; focus collection: {focus}.", "", *lines, "",
                      f"Rule: the best mean validation worst-group accuracy among options at mean validation "
                      f"macro-F1 >= {F1_FLOOR}. {verdict}"])


def _options(args: argparse.Namespace) -> list[dict[str, Any]]:
    options = [{"border": border, "balance": balance} for border, balance in itertools.product(args.border, args.balance)]
    return [option | {"epochs": args.epochs} for option in options] if args.epochs else options


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path("."), help="project root with data/processed and params.yaml")
    parser.add_argument("--border", nargs="+", default=list(get_args(Border)), choices=get_args(Border))
    parser.add_argument("--balance", nargs="+", default=["none", "group"], choices=get_args(Balance))
    parser.add_argument("--epochs", type=int, help="override train_custom.epochs for every option (exploration)")
    parser.add_argument("--seeds", type=int, nargs="+", help="train each option once per train.seed (default: params')")
    parser.add_argument("--focus", default=NIH, help="the collection whose scores get their own columns")
    parser.add_argument("--threads", type=int, help="override train.threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training_options"))
    args = parser.parse_args(argv)
    params = load_params(args.project / "params.yaml")
    if params.grouping is None:
        raise PipelineError(f"{args.project / 'params.yaml'}: groups.csv is not set; the worst group needs it")
    if args.threads is not None:
        params = with_train(params, threads=args.threads)
    configure_host(params.train)
    scores_path = args.out / "scores.json"
    for option, seed in itertools.product(_options(args), args.seeds or [params.train.seed]):
        name = run_name(option, seed)
        model = trained_model(args.project, with_train(params, seed=seed), option, args.out / name)
        entry = option_scores(model, args.project, params, args.focus)
        scores = update_scores(scores_path, name, {"option": option_label(option), "seed": seed} | entry)
    print(markdown(scores, args.focus))
    print()
    print(seeds_markdown(across_seeds(scores), args.focus))
    return scores


if __name__ == "__main__":
    run(main)
