"""Stage compare: ensemble row, results table with confidence intervals and significance, figures, report."""

import pandas as pd

from cxr import paths
from cxr.approaches import APPROACHES, DISPLAY_NAMES, ENSEMBLE
from cxr.console import run
from cxr.data.groups import load_groups
from cxr.evaluation.ensemble import ensemble_frame, ensemble_weights
from cxr.files import atomic_write, read_json, write_json, write_text
from cxr.params import load_params
from cxr.reporting.comparison import model_report, paired_tests, temperature_calibration
from cxr.reporting.external_report import external_markdown
from cxr.reporting.figures import confusion_png, reliability_png, roc_pr_png, write_curve_tables
from cxr.reporting.headline import external_scores, headline
from cxr.reporting.scores import classification_metrics
from cxr.reporting.shortcut_report import shortcuts_markdown
from cxr.reporting.subgroups import subgroup_report, subgroups_markdown
from cxr.reporting.tables import bar_chart, report_markdown, summary_markdown, summary_table


def main() -> None:
    params = load_params()
    classes, settings = params.data.classes, params.compare
    test = {name: pd.read_csv(paths.predictions_file(name)) for name in APPROACHES}
    val = {name: pd.read_csv(paths.val_predictions_file(name)) for name in APPROACHES}
    weights = ensemble_weights(val, classes, settings.ensemble_weights)
    test[ENSEMBLE], val[ENSEMBLE] = ensemble_frame(test, classes, weights), ensemble_frame(val, classes, weights)
    atomic_write(paths.predictions_file(ENSEMBLE), lambda tmp: test[ENSEMBLE].to_csv(tmp, index=False))

    scores = {name: classification_metrics(frame["label"], frame["predicted"], classes) for name, frame in test.items()}
    write_json(paths.metrics_file(ENSEMBLE), scores[ENSEMBLE])
    reports = {
        name: model_report(frame, classes, settings.bootstrap_resamples, settings.bootstrap_seed, settings.ece_bins)
        for name, frame in test.items()
    }
    calibrated = {}
    if settings.temperature_scaling:
        for name in test:
            reports[name]["calibration"], calibrated[name] = temperature_calibration(
                val[name], test[name], classes, settings.ece_bins
            )
    mcnemar, sentences = paired_tests(test, DISPLAY_NAMES, settings.alpha)
    write_json(paths.SUMMARY_JSON, {"models": reports, "mcnemar": mcnemar, "ensemble_weights": weights})

    table = summary_table(scores)
    summary = summary_markdown(table, reports, sentences, weights, classes, settings.bootstrap_resamples,
                               params.evaluate.tta) + "\n" + shortcuts_markdown(read_json(paths.SHORTCUTS_JSON))
    grouping = params.grouping
    subgroups = {}
    if grouping is not None:
        subgroups = subgroup_report(test, load_groups(grouping), classes, settings.bootstrap_resamples, settings.bootstrap_seed,
                                    params.split.unseen_groups, grouping.min_images)
        summary += "\n" + subgroups_markdown(subgroups, classes, grouping.group_column)
    write_json(paths.SUBGROUPS_JSON, subgroups)
    write_headlines(reports, subgroups)
    summary += "\n" + external_markdown(paths.EXTERNAL_MD)
    write_text(paths.SUMMARY_MD, summary)
    atomic_write(paths.SUMMARY_CSV, lambda tmp: table.round(6).to_csv(tmp, index=False))
    bar_chart(table, paths.PLOTS / "compare.png")
    roc_pr_png(test, classes, paths.PLOTS / "roc_pr.png")
    reliability_png(test, classes, paths.PLOTS / "reliability.png", settings.ece_bins, calibrated or None)
    write_curve_tables(test, classes, settings.ece_bins)
    confusion_png(test[ENSEMBLE], classes, f"{DISPLAY_NAMES[ENSEMBLE]}: test confusion matrix",
                  paths.evaluation_plots(ENSEMBLE) / "confusion.png")
    write_text(paths.REPORT, report_markdown(summary, APPROACHES))
    print(summary)


def write_headlines(reports: dict, subgroups: dict) -> None:
    """The flat metrics files DVC shows: headline scores of every model, and the external sets' scores."""
    external = {name: read_json(paths.external_metrics_file(name)) for name in read_json(paths.EXTERNAL_INDEX)["sets"]}
    write_json(paths.HEADLINE_JSON, headline(reports, read_json(paths.SHORTCUTS_JSON), subgroups, external))
    write_json(paths.EXTERNAL_SCORES_JSON, external_scores(external))


if __name__ == "__main__":
    run(main)
