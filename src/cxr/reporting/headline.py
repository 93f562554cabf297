"""The headline numbers DVC shows: one flat key per score, for ``dvc exp show`` and ``dvc metrics diff``.

The stages' full reports (``metrics/summary.json``, ``metrics/shortcuts.json``, subgroups,
external sets) hold hundreds of numbers and sentences; shown as metrics they bury the scores
that decide between experiments. These functions pick those scores out of the reports, under
short keys (``custom.acc``, ``custom.acc_lo``, ``ensemble.f1``, ``probe.lungs_hidden_acc``),
so the compare stage can write them as the only metrics file of the test results.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxr.reporting.shortcut_report import PROBE

SENSITIVE_CLASS = "COVID19"


def _with_interval(prefix: str, entry: Mapping[str, float]) -> dict[str, float]:
    return {prefix: entry["value"], f"{prefix}_lo": entry["ci_low"], f"{prefix}_hi": entry["ci_high"]}


def model_headline(report: Mapping[str, Any]) -> dict[str, float]:
    """A model's test accuracy and macro-F1 with their 95% interval ends, COVID19 sensitivity and ECE."""
    return {
        **_with_interval("acc", report["accuracy"]),
        **_with_interval("f1", report["f1_macro"]),
        "covid_sens": report["per_class"][SENSITIVE_CLASS]["sensitivity"]["value"],
        "ece": report["ece"],
    }


def headline(reports: Mapping[str, Mapping[str, Any]], shortcuts: Mapping[str, Any],
             subgroups: Mapping[str, Any], external: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Flat ``<model>.<score>`` keys from compare's reports, the shortcut audit, subgroups and external sets.

    ``reports`` maps each model to :func:`cxr.reporting.comparison.model_report`; ``subgroups`` is
    compare's subgroup report (empty without ``groups``) and ``external`` maps each
    external set to its report (empty without ``external``), so those keys appear only where
    the pipeline computed them. Lungs-hidden accuracy is the shortcut audit's, and ``probe``
    holds the border probe's accuracy: both measure how much is solvable without the lungs.
    """
    flat: dict[str, float] = {}
    for model, report in reports.items():
        flat |= {f"{model}.{key}": value for key, value in model_headline(report).items()}
        audited = shortcuts["models"].get(model)
        if audited is not None:
            flat[f"{model}.lungs_hidden_acc"] = audited["center_hidden"]["accuracy"]["value"]
        if model in subgroups:
            worst = subgroups[model]["worst_group"]
            flat[f"{model}.worst_group_acc"] = subgroups[model]["groups"][worst]["accuracy"]["value"]
        for name, scores in external.items():
            if model in scores["models"]:
                flat[f"{model}.{name}_f1_gap"] = scores["models"][model]["gap"]["f1_macro"]["value"]
    flat[f"{PROBE}.lungs_hidden_acc"] = shortcuts[PROBE]["center_hidden"]["accuracy"]["value"]
    return flat


def external_scores(external: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Flat ``<set>.<model>.<score>`` keys: accuracy with interval ends, macro-F1, and both gaps to the internal test."""
    flat: dict[str, float] = {}
    for name, scores in external.items():
        for model, entry in scores["models"].items():
            values = {**_with_interval("acc", entry["accuracy"]), "f1": entry["f1_macro"]["value"],
                      "acc_gap": entry["gap"]["accuracy"]["value"], "f1_gap": entry["gap"]["f1_macro"]["value"]}
            flat |= {f"{name}.{model}.{key}": value for key, value in values.items()}
    return flat
