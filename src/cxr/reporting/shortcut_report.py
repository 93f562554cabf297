"""The shortcut audit's verdicts: numbers with intervals, a flag, and one sentence a clinician can read.

A model is flagged when, with the lung fields hidden, it keeps more than ``flag_share`` of
its above-chance accuracy: it then decides mostly from outside the lungs. The border probe
(a model trained and tested with the lung fields hidden) is flagged when it beats chance by
more than ``probe_margin``: the data set itself can then be solved without seeing the lungs,
so a high score on it proves little about disease.

Each reading rests on a 95% interval, not on a point value: a model whose intact accuracy
is not clearly above chance, or whose share's interval holds the flag (the probe's, chance
+ ``probe_margin``), gets "no verdict" rather than a sentence the data cannot carry.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxr import stats
from cxr.approaches import DISPLAY_NAMES
from cxr.reporting.comparison import interval
from cxr.reporting.pngs import png_figure

PROBE = "probe"
VIEW_TITLES = {"intact": "Intact", "center_hidden": "Lungs hidden", "border_hidden": "Only lungs shown"}
FLAGS = {"shortcut": "shortcut", "lungs": "-", "both": "-", "none": "no verdict"}
PROBE_FLAGS = {"shortcut": "shortcut in the data", "clear": "-", "none": "no verdict"}


def view_scores(labels: np.ndarray, probabilities: np.ndarray, resamples: int, seed: int) -> dict[str, dict[str, float]]:
    """Accuracy and macro-F1 of one view of the test split, each with its 95% bootstrap interval."""
    predicted = probabilities.argmax(axis=1)
    return {
        "accuracy": interval(labels, predicted, stats.accuracy, resamples, seed),
        "f1_macro": interval(labels, predicted, stats.macro_f1(probabilities.shape[1]), resamples, seed),
    }


def mean_interval(values: np.ndarray) -> dict[str, float]:
    """Mean with a normal-approximation 95% interval (the values are shares in [0, 1], many per class)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    half = float(1.96 * values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    mean = float(values.mean())
    return {"value": round(mean, 6), "ci_low": round(mean - half, 6), "ci_high": round(mean + half, 6)}


def retained_share(intact: float, hidden: float, chance: float) -> float:
    """The share of the above-chance accuracy a model keeps with the lungs hidden (0 = chance, 1 = all of it)."""
    above = intact - chance
    return round(float((hidden - chance) / above), 6) if above > 0 else 0.0


def share_interval(labels: np.ndarray, intact: np.ndarray, other: np.ndarray, chance: float, resamples: int,
                   seed: int) -> dict[str, float]:
    """:func:`retained_share` of predicted classes ``other`` against ``intact``, with a paired 95% bootstrap interval.

    Both views are scored on the same resampled images (the rows are drawn together), so the
    interval carries the pairing: a model that is right on the same films in both views has a
    narrower share interval than two independent accuracies would give.
    """
    def share(y_true: np.ndarray, paired: np.ndarray) -> float:
        return retained_share(stats.accuracy(y_true, paired[:, 0]), stats.accuracy(y_true, paired[:, 1]), chance)

    return interval(labels, np.column_stack([intact, other]), share, resamples, seed)


def model_scores(labels: np.ndarray, probabilities: Mapping[str, np.ndarray], chance: float, resamples: int,
                 seed: int) -> dict[str, Any]:
    """A model's :func:`view_scores` in every view, with the share it keeps with the lungs hidden and with them alone."""
    entry: dict[str, Any] = {view: view_scores(labels, probabilities[view], resamples, seed) for view in VIEW_TITLES}
    predicted = {view: probabilities[view].argmax(axis=1) for view in VIEW_TITLES}
    entry["retained_share"] = share_interval(labels, predicted["intact"], predicted["center_hidden"], chance,
                                             resamples, seed)
    entry["lungs_only_share"] = share_interval(labels, predicted["intact"], predicted["border_hidden"], chance,
                                               resamples, seed)
    return entry


def _spans(entry: Mapping[str, float], threshold: float) -> bool:
    """Whether a 95% interval holds ``threshold``: the data cannot say on which side of it the value lies."""
    return bool(entry["ci_low"] <= threshold <= entry["ci_high"])


def _pct(entry: Mapping[str, float]) -> str:
    return f"{entry['value']:.0%} [{entry['ci_low']:.0%}, {entry['ci_high']:.0%}]"


def model_verdict(entry: dict[str, Any], chance: float, flag_share: float) -> dict[str, Any]:
    """``entry`` (a model's :func:`model_scores`) with its verdict, its flag and a one-sentence reading.

    A verdict needs evidence: a model whose intact accuracy interval reaches chance has no skill
    whose source could be traced, and a retained share whose interval holds ``flag_share``
    could lie on either side of the flag; both get "no verdict" instead of a guess. So does a
    model trained with ``border: hide`` or ``crop`` (``entry["border"]``): it never sees the film
    around its box, so its fall with the lungs hidden is met by construction, not evidence.
    """
    intact, hidden, lungs_only = (entry[view]["accuracy"] for view in ("intact", "center_hidden", "border_hidden"))
    kept, kept_by_lungs = entry["retained_share"], entry["lungs_only_share"]
    border = entry.get("border", "keep")
    if border != "keep":
        verdict, reading = "none", (
            f"No verdict, by construction: trained with border: {border}, it never sees the film outside its centred "
            "box, so covering the lung fields leaves it little or nothing but grey and its fall towards chance is no "
            "evidence; this test cannot show whether it reads the lungs.")
    elif intact["ci_low"] <= chance:
        verdict, reading = "none", (f"No verdict: its intact accuracy {_ci(intact)} is not above chance ({chance:.3f}), "
                                    "so there is no skill whose source this test could trace.")
    elif _spans(kept, flag_share):
        verdict, reading = "none", (f"No verdict: with the lung fields covered it keeps {_pct(kept)} of its above-chance "
                                    f"accuracy, an interval on both sides of the flag at {flag_share:.0%}.")
    elif kept["ci_low"] > flag_share:
        verdict, reading = "shortcut", (
            f"With the lung fields covered it still classifies {hidden['value']:.0%} of films correctly "
            f"(chance {chance:.0%}, intact {intact['value']:.0%}; it keeps {_pct(kept)} of its above-chance accuracy): "
            "it decides largely from outside the lungs, such as markers, borders or body size.")
    elif kept_by_lungs["ci_low"] > flag_share:
        verdict, reading = "lungs", (
            f"Covering the lung fields drops it to {hidden['value']:.0%} (chance {chance:.0%}), while the lungs alone give "
            f"{lungs_only['value']:.0%} of {intact['value']:.0%}: it relies mostly on the lung fields.")
    elif kept_by_lungs["ci_high"] < flag_share:
        verdict, reading = "both", (
            f"Covering the lung fields drops it to {hidden['value']:.0%} (chance {chance:.0%}), but the lungs alone give "
            f"only {lungs_only['value']:.0%} of {intact['value']:.0%}: it needs the film around them too, so this test "
            "cannot show that it reads the lungs.")
    else:
        verdict, reading = "none", (
            f"Covering the lung fields drops it to {hidden['value']:.0%} (chance {chance:.0%}); the lungs alone keep "
            f"{_pct(kept_by_lungs)} of its above-chance accuracy, an interval on both sides of {flag_share:.0%}: "
            "no verdict on whether it reads the lungs.")
    return {**entry, "verdict": verdict, "flagged": verdict == "shortcut", "reading": reading}


def probe_verdict(entry: dict[str, Any], chance: float, probe_margin: float) -> dict[str, Any]:
    """The border probe's score with its flag and reading: how far the task is solvable without the lungs.

    Flagged when its accuracy interval lies wholly above chance + ``probe_margin``; an interval
    that holds that bar gets no verdict.
    """
    score = entry["center_hidden"]["accuracy"]
    bar = chance + probe_margin
    opening = f"A model that never sees the lung fields reaches {_ci(score)} (chance {chance:.3f}): "
    if _spans(score, bar):
        verdict, ending = "none", (f"no verdict, the interval holds chance + {probe_margin:g} ({bar:.3f}), the bar for "
                                   "saying the data set can be solved without the lungs.")
    elif score["ci_low"] > bar:
        verdict, ending = "shortcut", ("this data set can be solved largely from outside the lungs, so high scores prove "
                                       "little about disease.")
    else:
        verdict, ending = "clear", "outside the lungs there is little to learn the classes from."
    return {**entry, "verdict": verdict, "flagged": verdict == "shortcut", "reading": opening + ending}


def _ci(entry: Mapping[str, float]) -> str:
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def _cam_cell(entry: Mapping[str, Any]) -> str:
    """The Grad-CAM column: the mass inside the box, or why a cropping model has none (it would be 1 by construction)."""
    cam = entry["cam_inside_center"]
    return "- (crops to the box: 1 by construction)" if cam is None else _ci(cam["all"])


def _flag(entry: Mapping[str, Any]) -> str:
    """The flag column; a hide or crop model's "no verdict" says that its numbers are met by construction."""
    flag = FLAGS[entry["verdict"]]
    return f"{flag} (border: {entry['border']}, by construction)" if entry.get("border", "keep") != "keep" else flag


def shortcuts_markdown(audit: Mapping[str, Any]) -> str:
    """The report section: a table per view with intervals, Grad-CAM inside the lungs, and one reading per model."""
    chance = audit["chance"]
    lines = [
        "## Does the model read the lungs?",
        "",
        f"The test split scored intact, with a centred box of {audit['center_fraction']:.0%} of width and height "
        "(the lung fields) hidden, and with everything outside it hidden. Chance (a guess at the class "
        f"frequencies): accuracy {chance['accuracy']:.3f}, macro-F1 {chance['f1_macro']:.3f}.",
        "",
        "| Model | Intact accuracy | Lungs hidden | Only lungs shown | Kept with lungs hidden | Grad-CAM inside lungs | Flag |",
        "|---|---|---|---|---:|---|---|",
    ]
    for name, entry in audit["models"].items():
        lines.append(
            f"| {DISPLAY_NAMES.get(name, name)} | {_ci(entry['intact']['accuracy'])} | "
            f"{_ci(entry['center_hidden']['accuracy'])} | {_ci(entry['border_hidden']['accuracy'])} | "
            f"{_pct(entry['retained_share'])} | {_cam_cell(entry)} | {_flag(entry)} |"
        )
    probe = audit[PROBE]
    lines.append(f"| Border probe (trained without the lungs) | - | {_ci(probe['center_hidden']['accuracy'])} | - | - | - | "
                 f"{PROBE_FLAGS[probe['verdict']]} |")
    lines += ["", *(f"- **{DISPLAY_NAMES.get(name, name)}.** {entry['reading']}" for name, entry in audit["models"].items()),
              f"- **Border probe.** {probe['reading']}", ""]
    return "\n".join(lines)


def shortcuts_png(audit: Mapping[str, Any], path: Path) -> None:
    """Accuracy of each model per view with 95% intervals, the probe beside them and chance as a line."""
    names = [*audit["models"], PROBE]
    with png_figure(path, 100, figsize=(2.2 * len(names) + 2, 4.2), layout="constrained") as (_, axes):
        ax = axes[0, 0]
        width = 0.8 / len(VIEW_TITLES)
        for offset, (view, title) in enumerate(VIEW_TITLES.items()):
            xs, values, errors = [], [], []
            for index, name in enumerate(names):
                entry = audit["models"].get(name) or audit[PROBE]
                if view not in entry:
                    continue
                score = entry[view]["accuracy"]
                xs.append(index + (offset - 1) * width)
                values.append(score["value"])
                errors.append([score["value"] - score["ci_low"], score["ci_high"] - score["value"]])
            ax.bar(xs, values, width, yerr=np.array(errors).T if errors else None, capsize=3, label=title, color=f"C{offset}")
        ax.axhline(audit["chance"]["accuracy"], color="grey", linestyle=":", label="chance")
        ax.set_xticks(range(len(names)), [DISPLAY_NAMES.get(n, "Border probe") for n in names], fontsize="small")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("test accuracy")
        ax.set_title("Shortcut audit: accuracy with the lung fields hidden or shown alone")
        ax.legend(fontsize="small", loc="lower right")
