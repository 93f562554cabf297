"""The shortcut audit's verdicts: numbers with intervals, a flag, and one sentence a clinician can read.

A model is flagged when, with the lung fields hidden, it keeps more than ``flag_share`` of
its above-chance accuracy: it then decides mostly from outside the lungs. The border probe
(a model trained and tested with the lung fields hidden) is flagged when it beats chance by
more than ``probe_margin``: the data set itself can then be solved without seeing the lungs,
so a high score on it proves little about disease.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxr.approaches import DISPLAY_NAMES
from cxr.reporting import stats
from cxr.reporting.comparison import interval
from cxr.reporting.pngs import png_figure

PROBE = "probe"
VIEW_TITLES = {"intact": "Intact", "center_hidden": "Lungs hidden", "border_hidden": "Only lungs shown"}


def view_scores(labels: np.ndarray, probabilities: np.ndarray, resamples: int, seed: int) -> dict[str, dict[str, float]]:
    """Accuracy and macro-F1 of one view of the test split, each with its 95% bootstrap interval."""
    predicted = probabilities.argmax(axis=1)
    return {
        "accuracy": interval(labels, predicted, stats.accuracy, resamples, seed),
        "f1_macro": interval(labels, predicted, stats.macro_f1, resamples, seed),
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


def model_verdict(entry: dict[str, Any], chance: float, flag_share: float) -> dict[str, Any]:
    """``entry`` (a model's view scores) with its retained share, its flag and a one-sentence reading."""
    intact = entry["intact"]["accuracy"]["value"]
    hidden = entry["center_hidden"]["accuracy"]["value"]
    lungs_only = entry["border_hidden"]["accuracy"]["value"]
    share = retained_share(intact, hidden, chance)
    flagged = share > flag_share
    if flagged:
        reading = (f"With the lung fields covered it still classifies {hidden:.0%} of films correctly "
                   f"(chance {chance:.0%}, intact {intact:.0%}): it decides largely from outside the lungs, "
                   "such as markers, borders or body size.")
    elif retained_share(intact, lungs_only, chance) > flag_share:
        reading = (f"Covering the lung fields drops it to {hidden:.0%} (chance {chance:.0%}), while the lungs "
                   f"alone give {lungs_only:.0%} of {intact:.0%}: it relies mostly on the lung fields.")
    else:
        reading = (f"Covering the lung fields drops it to {hidden:.0%} (chance {chance:.0%}), but the lungs alone "
                   f"give only {lungs_only:.0%} of {intact:.0%}: it needs the film around them too, so this test "
                   "cannot show that it reads the lungs.")
    return {**entry, "retained_share": share, "flagged": flagged, "reading": reading}


def probe_verdict(entry: dict[str, Any], chance: float, probe_margin: float) -> dict[str, Any]:
    """The border probe's score with its flag and reading: how far the task is solvable without the lungs."""
    accuracy = entry["center_hidden"]["accuracy"]["value"]
    flagged = accuracy - chance > probe_margin
    reading = (f"A model that never sees the lung fields reaches {accuracy:.0%} (chance {chance:.0%}): "
               + ("this data set can be solved largely from outside the lungs, so high scores prove little "
                  "about disease." if flagged else "outside the lungs there is little to learn the classes from."))
    return {**entry, "flagged": flagged, "reading": reading}


def _ci(entry: Mapping[str, float]) -> str:
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


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
            f"{entry['retained_share']:.0%} | {_ci(entry['cam_inside_center']['all'])} | "
            f"{'shortcut' if entry['flagged'] else '-'} |"
        )
    probe = audit[PROBE]
    lines.append(f"| Border probe (trained without the lungs) | - | {_ci(probe['center_hidden']['accuracy'])} | - | - | - | "
                 f"{'shortcut in the data' if probe['flagged'] else '-'} |")
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
