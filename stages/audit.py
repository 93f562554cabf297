"""Stage audit: near-duplicate images across train/val/test; with split.dedupe, drop them from train/val."""

import pandas as pd

from cxr import paths
from cxr.console import run
from cxr.data.audit import audit_splits
from cxr.data.split import SPLIT_NAMES
from cxr.files import atomic_write, write_json
from cxr.params import load_params


def main() -> None:
    params = load_params()
    splits = {name: pd.read_csv(paths.SPLITS / f"{name}.csv", dtype=str) for name in SPLIT_NAMES}
    audited, pairs, summary = audit_splits(
        paths.RAW, splits, params.audit.threshold, params.audit.workers, params.split.dedupe
    )
    for name, frame in audited.items():
        atomic_write(paths.AUDITED / f"{name}.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    write_json(paths.AUDIT_SUMMARY, summary)
    atomic_write(paths.DUPLICATES_REPORT, lambda tmp: pairs.to_csv(tmp, index=False))


if __name__ == "__main__":
    run(main)
