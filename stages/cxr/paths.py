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
PLOTS = Path("plots")
REPORTS = Path("reports")
DATA_METRICS = METRICS / "data.json"
SKIPPED_REPORT = REPORTS / "skipped_images.csv"


def model_file(approach: str) -> Path:
    return MODELS / f"{approach}.pt"


def resume_file(approach: str) -> Path:
    return MODELS / f"{approach}.resume.pt"


def live_dir(approach: str) -> Path:
    return PLOTS / approach


def metrics_file(approach: str) -> Path:
    return METRICS / f"{approach}.json"


def predictions_file(approach: str) -> Path:
    return PREDICTIONS / f"{approach}.csv"
