"""Score every external test set of ``params.yaml`` with every trained model and the ensemble, and write the results.

The external stage's work once its sets are fetched: decode each set at every model's image
size, score it as the evaluate stages score (``evaluate.tta`` included), ensemble with compare's
weights (fitted on validation predictions) and write, per set, the JSON report with the gap to
the internal test score, a Markdown table, per-image predictions and the skipped files.
"""

from __future__ import annotations

import pandas as pd

from cxr import paths
from cxr.approaches import APPROACHES
from cxr.data.sources import shown_source
from cxr.evaluation.ensemble import ensemble_weights
from cxr.evaluation.external_scoring import (
    DecodedSet,
    decode_set,
    decode_workers,
    image_sizes,
    internal_predictions,
    list_images,
    load_scorers,
    score_set,
)
from cxr.files import atomic_write, write_json, write_text
from cxr.params import Params
from cxr.reporting.external_report import set_markdown, set_report
from cxr.training.runtime import configure_host, memory_format_of, select_device


def write_set(name: str, report: dict, frames: dict[str, pd.DataFrame], decoded: DecodedSet) -> str:
    """One set's JSON, predictions and skipped files; returns its Markdown table (also written)."""
    for model, frame in frames.items():
        atomic_write(paths.external_predictions_file(name, model), lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    atomic_write(paths.external_skipped_file(name), lambda tmp: decoded.skipped.to_csv(tmp, index=False))
    write_json(paths.external_metrics_file(name), report)
    markdown = set_markdown(name, report)
    write_text(paths.external_markdown_file(name), markdown)
    return markdown


def score_sets(params: Params, scopes: dict[str, str]) -> dict[str, str]:
    """Score every fetched set with every model and the ensemble; returns each set's Markdown table."""
    classes, settings = params.data.classes, params.compare
    configure_host(params.train)
    device, layout = select_device(params.train.device), memory_format_of(params.train)
    val = {approach: pd.read_csv(paths.val_predictions_file(approach)) for approach in APPROACHES}
    weights = ensemble_weights(val, classes, settings.ensemble_weights)
    internal = internal_predictions({approach: paths.predictions_file(approach) for approach in APPROACHES}, classes, weights)
    files = {approach: paths.model_file(approach) for approach in APPROACHES}
    sizes = image_sizes(files)
    decoded = {name: decode_set(paths.EXTERNAL_DATA / name, list_images(paths.EXTERNAL_DATA / name, classes), sizes,
                                decode_workers()) for name in scopes}
    scorers = load_scorers(files, classes, params.evaluate.tta, device, layout)
    sections = {}
    for name, scope in scopes.items():
        frames = score_set(scorers, decoded[name], classes, weights, params.evaluate.batch_size, device, layout)
        report = {
            "name": name, "source": shown_source(params.external[name]), "scope": scope, "skipped": len(decoded[name].skipped),
            "tta": [approach for approach in APPROACHES if approach in params.evaluate.tta],
            "ensemble_weights": weights, "bootstrap_resamples": settings.bootstrap_resamples,
            **set_report(frames, internal, classes, settings.bootstrap_resamples, settings.bootstrap_seed),
        }
        sections[name] = write_set(name, report, frames, decoded[name])
    return sections
