"""Run the shortcut audit on trained models: every view of the test split, Grad-CAM mass, the border probe.

Kept apart from :mod:`cxr.reporting.shortcut_report` (verdicts, table, figure) so the compare stage
reads the audit's results without importing torch or the models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from torch import nn

from cxr.evaluation.shortcut_occlusion import VIEWS, cam_inside_center, chance_scores, occluded, per_class_sample
from cxr.params import ShortcutsParams
from cxr.reporting.shortcut_report import PROBE, mean_interval, model_scores, model_verdict, probe_verdict, view_scores
from cxr.training.models import Classifier

Scorer = Callable[[nn.Module, np.ndarray], np.ndarray]
"""Class probabilities (N, classes) of a model for uint8 images (N, H, W)."""


def shortcut_audit(models: Mapping[str, tuple[nn.Module, Classifier]], probe: nn.Module, images: np.ndarray,
                   labels: np.ndarray, classes: list[str], fill: int, settings: ShortcutsParams, score: Scorer,
                   resamples: int, seed: int) -> dict[str, Any]:
    """The whole audit of ``models`` ({name: (module scored as evaluated, its plain classifier for Grad-CAM)}).

    Each model scores the test images in every view; Grad-CAM runs on ``settings.cam_per_class``
    images per class; the probe scores the view it was trained on (lungs hidden). Each entry
    records the model's ``border`` option: a model that crops to its box has a Grad-CAM map on
    that box only, so its mass inside it is 1 by construction and is not computed (``None``).
    """
    chance = chance_scores(labels, len(classes))
    views = {view: occluded(images, view, settings.center_fraction, fill) for view in VIEWS}
    sample = per_class_sample(labels, settings.cam_per_class, seed)
    audited = {}
    for name, (scored, classifier) in models.items():
        entry = model_scores(labels, {view: score(scored, views[view]) for view in VIEWS}, chance["accuracy"],
                             resamples, seed)
        entry["border"] = classifier.norm.border
        entry["cam_inside_center"] = None if entry["border"] == "crop" else _cam_mass(
            classifier, images[sample], labels[sample], classes, settings.center_fraction)
        audited[name] = model_verdict(entry, chance["accuracy"], settings.flag_share)
    probe_entry = {"center_hidden": view_scores(labels, score(probe, views["center_hidden"]), resamples, seed)}
    return {
        "center_fraction": settings.center_fraction,
        "flag_share": settings.flag_share,
        "probe_margin": settings.probe_margin,
        "fill": fill,
        "chance": chance,
        "models": audited,
        PROBE: probe_verdict(probe_entry, chance["accuracy"], settings.probe_margin),
    }


def _cam_mass(classifier: Classifier, images: np.ndarray, labels: np.ndarray, classes: list[str],
              fraction: float) -> dict[str, Any]:
    """The share of Grad-CAM mass inside the centre box: mean with interval, overall and per true class."""
    shares = cam_inside_center(classifier, images, fraction)
    return {
        "all": mean_interval(shares),
        "per_class": {label: mean_interval(shares[labels == i]) for i, label in enumerate(classes)},
    }
