"""Stage external: every trained model and the ensemble scored on the external test sets of params.yaml.

Nothing is retrained: each set under ``external`` is fetched into data/external/<name>/, its
images decoded as preprocess decodes them, scored as the evaluate stages score (``evaluate.tta``
included) and ensembled with compare's weights (fitted on validation predictions). Per set it
writes metrics/external/<name>.json (scores with 95% intervals and the gap to the internal test
score), a Markdown table, per-image predictions and the skipped files; metrics/external/index.json
and index.md exist even when no set is listed, so compare always finds them.
"""

import shutil

import pandas as pd

from cxr import paths
from cxr.approaches import APPROACHES
from cxr.console import run
from cxr.evaluation.external import (
    DecodedSet,
    check_sets,
    decode_set,
    decode_workers,
    fetch_external,
    image_sizes,
    internal_predictions,
    list_images,
    load_scorers,
    score_set,
)
from cxr.files import atomic_write, write_json, write_text
from cxr.params import Params, load_params
from cxr.reporting.comparison import ensemble_weights
from cxr.reporting.external import index_markdown, set_markdown, set_report
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
            "name": name, "source": params.external[name], "scope": scope, "skipped": len(decoded[name].skipped),
            "tta": [approach for approach in APPROACHES if approach in params.evaluate.tta],
            "ensemble_weights": weights, "bootstrap_resamples": settings.bootstrap_resamples,
            **set_report(frames, internal, classes, settings.bootstrap_resamples, settings.bootstrap_seed),
        }
        sections[name] = write_set(name, report, frames, decoded[name])
    return sections


def main() -> None:
    params = load_params()
    check_sets(params.external)
    for folder in (paths.EXTERNAL_DATA, paths.EXTERNAL_METRICS):
        shutil.rmtree(folder, ignore_errors=True)
    paths.EXTERNAL_DATA.mkdir(parents=True)
    scopes = {name: fetch_external(name, source, params.data.classes, paths.EXTERNAL_DATA / name)
              for name, source in params.external.items()}
    sections = score_sets(params, scopes) if scopes else {}
    write_json(paths.EXTERNAL_INDEX, {
        "sets": {name: {"source": params.external[name], "scope": scope,
                        "metrics": paths.external_metrics_file(name).as_posix()} for name, scope in scopes.items()},
    })
    markdown = index_markdown(sections, params.compare.bootstrap_resamples)
    write_text(paths.EXTERNAL_MD, markdown)
    print(markdown)


if __name__ == "__main__":
    run(main)
