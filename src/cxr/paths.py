"""Where each stage reads and writes, relative to the project root (mirrors ``dvc.yaml``)."""

from pathlib import Path

RAW = Path("data/raw")
SPLITS = Path("data/split")
HELD_OUT = SPLITS / "held_out.csv"  # Data/train images of split.unseen_groups, in neither train nor val
AUDITED = Path("data/audited")
AUDIT_SUMMARY = AUDITED / "audit.json"
DUPLICATES_REPORT = Path("reports/duplicates.csv")
SPLIT_REPORT = Path("reports/split.json")
PROCESSED = Path("data/processed")
MODELS = Path("models")
METRICS = Path("metrics")
PREDICTIONS = METRICS / "predictions"
VAL_PREDICTIONS = Path("data/val_predictions")
PLOTS = Path("plots")
# ROC, PR and calibration points as CSV for `dvc plots show/diff`: one file per curve, since a DVC
# plot definition cannot split one file's rows into lines (one line per model and class).
CURVES = PLOTS / "curves"
LIVE = Path("dvclive")
REPORTS = Path("reports")
DATA_METRICS = METRICS / "data.json"
SKIPPED_REPORT = REPORTS / "skipped_images.csv"
REPORT = REPORTS / "report.md"
SUMMARY_MD = METRICS / "summary.md"
SUMMARY_CSV = METRICS / "summary.csv"
SUMMARY_JSON = METRICS / "summary.json"
SHORTCUTS_JSON = METRICS / "shortcuts.json"
SUBGROUPS_JSON = METRICS / "subgroups.json"
# the only metrics files of the test results (dvc exp show): flat keys picked from the reports above
HEADLINE_JSON = METRICS / "headline.json"
EXTERNAL_SCORES_JSON = METRICS / "external_scores.json"
PROBE_DATA = Path("data/probe")
PROBE_MODEL = MODELS / "probe.pt"
# external test sets (params ``external``): the fetched images, and per set its scores, table and predictions
EXTERNAL_DATA = Path("data/external")
EXTERNAL_METRICS = METRICS / "external"
EXTERNAL_INDEX = EXTERNAL_METRICS / "index.json"
EXTERNAL_MD = EXTERNAL_METRICS / "index.md"


def model_file(approach: str) -> Path:
    return MODELS / f"{approach}.pt"


def resume_file(approach: str) -> Path:
    return MODELS / f"{approach}.resume.pt"


def live_dir(approach: str) -> Path:
    """DVCLive's folder for one approach's learning curves (it adds ``plots/metrics/`` inside)."""
    return LIVE / approach


def metrics_file(approach: str) -> Path:
    return METRICS / f"{approach}.json"


def predictions_file(model: str) -> Path:
    return PREDICTIONS / f"{model}.csv"


def val_predictions_file(approach: str) -> Path:
    return VAL_PREDICTIONS / f"{approach}.csv"


def evaluation_plots(model: str) -> Path:
    return PLOTS / "evaluate" / model


def misclassified_file(model: str) -> Path:
    return REPORTS / "misclassified" / f"{model}.csv"


def roc_curve_file(class_name: str, model: str) -> Path:
    return CURVES / "roc" / class_name / f"{model}.csv"


def pr_curve_file(class_name: str, model: str) -> Path:
    return CURVES / "pr" / class_name / f"{model}.csv"


def calibration_file(model: str) -> Path:
    return CURVES / "calibration" / f"{model}.csv"


def external_metrics_file(name: str) -> Path:
    return EXTERNAL_METRICS / f"{name}.json"


def external_markdown_file(name: str) -> Path:
    return EXTERNAL_METRICS / f"{name}.md"


def external_predictions_file(name: str, model: str) -> Path:
    return EXTERNAL_METRICS / name / "predictions" / f"{model}.csv"


def external_skipped_file(name: str) -> Path:
    return EXTERNAL_METRICS / name / "skipped.csv"
