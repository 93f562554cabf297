"""Stage preprocess: decode every image once into uint8 arrays; report unreadable files."""

import pandas as pd

from cxr import paths
from cxr.console import run
from cxr.data.preprocess import preprocess_split
from cxr.data.split import SPLIT_NAMES, class_counts
from cxr.files import atomic_write, read_json, write_json
from cxr.params import load_params


def main() -> None:
    params = load_params()
    classes = params.data.classes
    listed, kept, skipped = {}, {}, []
    for split in SPLIT_NAMES:
        listed[split] = pd.read_csv(paths.AUDITED / f"{split}.csv", dtype=str)
        kept[split], failures = preprocess_split(
            paths.RAW, listed[split], params.preprocess.image_size, params.preprocess.workers, split, classes,
            paths.PROCESSED,
        )
        skipped.append(failures)
    report = pd.concat(skipped, ignore_index=True)[["split", "path", "label", "reason"]]
    atomic_write(paths.SKIPPED_REPORT, lambda tmp: report.to_csv(tmp, index=False))
    write_json(
        paths.DATA_METRICS,
        {
            "listed": class_counts(listed, classes),
            "processed": class_counts(kept, classes),
            "skipped": {split: int((report["split"] == split).sum()) for split in SPLIT_NAMES},
            "image_size": params.preprocess.image_size,
            "audit": read_json(paths.AUDIT_SUMMARY),
        },
    )


if __name__ == "__main__":
    run(main)
