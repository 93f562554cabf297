"""Where each stage reads and writes, relative to the project root (mirrors ``dvc.yaml``)."""

from pathlib import Path

RAW = Path("data/raw")
SPLITS = Path("data/split")
AUDITED = Path("data/audited")
AUDIT_SUMMARY = AUDITED / "audit.json"
DUPLICATES_REPORT = Path("reports/duplicates.csv")
PROCESSED = Path("data/processed")
MODELS = Path("models")
METRICS = Path("metrics")
PREDICTIONS = METRICS / "predictions"
VAL_PREDICTIONS = Path("data/val_predictions")
PLOTS = Path("plots")
REPORTS = Path("reports")
DATA_METRICS = METRICS / "data.json"
SKIPPED_REPORT = REPORTS / "skipped_images.csv"
REPORT = REPORTS / "report.md"
SUMMARY_MD = METRICS / "summary.md"
SUMMARY_CSV = METRICS / "summary.csv"
SUMMARY_JSON = METRICS / "summary.json"


def model_file(approach: str) -> Path:
    return MODELS / f"{approach}.pt"


def resume_file(approach: str) -> Path:
    return MODELS / f"{approach}.resume.pt"


def live_dir(approach: str) -> Path:
    return PLOTS / approach


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
