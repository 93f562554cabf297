"""Stage external: every trained model and the ensemble scored on the external test sets of params.yaml.

Nothing is retrained: every set's source under ``external`` is checked first (a source inside the
pipeline's output folders is refused before data/external is cleared), then fetched into
data/external/<name>/ (URLs shown without credentials or query values in index.json), its
images decoded as preprocess decodes them, scored as the evaluate stages score (``evaluate.tta``
included) and ensembled with compare's weights (fitted on validation predictions). Per set it
writes metrics/external/<name>.json (scores with 95% intervals and the gap to the internal test
score), a Markdown table, per-image predictions and the skipped files; metrics/external/index.json
and index.md exist even when no set is listed, so compare always finds them.
"""

import shutil

from cxr import paths
from cxr.console import run
from cxr.evaluation.external_scoring import check_sets, fetch_external, resolve_external
from cxr.files import write_json, write_text
from cxr.params import load_params
from cxr.reporting.external_report import index_markdown
from cxr.reporting.external_sets import score_sets


def main() -> None:
    params = load_params()
    check_sets(params.external)
    # every source checked before data/external is cleared: one inside it would be deleted first
    sources = {name: resolve_external(name, source, paths.EXTERNAL_DATA / name) for name, source in params.external.items()}
    for folder in (paths.EXTERNAL_DATA, paths.EXTERNAL_METRICS):
        shutil.rmtree(folder, ignore_errors=True)
    paths.EXTERNAL_DATA.mkdir(parents=True)
    scopes = {name: fetch_external(name, source, params.data.classes, paths.EXTERNAL_DATA / name)
              for name, source in sources.items()}
    sections = score_sets(params, scopes) if scopes else {}
    write_json(paths.EXTERNAL_INDEX, {
        "sets": {name: {"source": sources[name].shown, "scope": scope,
                        "metrics": paths.external_metrics_file(name).as_posix()} for name, scope in scopes.items()},
    })
    markdown = index_markdown(sections, params.compare.bootstrap_resamples)
    write_text(paths.EXTERNAL_MD, markdown)
    print(markdown)


if __name__ == "__main__":
    run(main)
