"""Stage split: patient-grouped, stratified train/val split of Data/train; Data/test as is.

With ``groups`` set, the CSV is checked here, the first stage that uses it, and its match
rate logged. ``split.unseen_groups`` keeps every Data/train image of those groups out of
train and val (listed in data/split/held_out.csv, counted per group in reports/split.json),
so their test scores measure collections the model never saw.
"""

import pandas as pd

from cxr import paths
from cxr.console import run
from cxr.data.groups import check_known, load_groups, log_matches, unseen_images, unseen_report
from cxr.data.split import SPLIT_NAMES, index_split, make_splits
from cxr.files import atomic_write, write_json
from cxr.params import load_params


def main() -> None:
    params = load_params()
    classes, unseen, grouping = params.data.classes, params.split.unseen_groups, params.grouping
    held_out = pd.DataFrame(columns=["path", "label", "patient", "group"])
    report: dict = {"unseen_groups": {}}
    if grouping is not None:
        groups = load_groups(grouping)
        check_known(unseen, groups, "split.unseen_groups")
        pool, test = index_split(paths.RAW, "train", classes), index_split(paths.RAW, "test", classes)
        log_matches(grouping, groups, pool["path"], "train")
        log_matches(grouping, groups, test["path"], "test")
        held_out = unseen_images(pool, groups, unseen)
        report["unseen_groups"] = unseen_report(held_out, test, groups, unseen)
    splits = make_splits(paths.RAW, classes, params.split.val_fraction, params.split.seed, set(held_out["path"]))
    for name in SPLIT_NAMES:
        atomic_write(paths.SPLITS / f"{name}.csv", lambda tmp, frame=splits[name]: frame.to_csv(tmp, index=False))
    atomic_write(paths.HELD_OUT, lambda tmp: held_out.to_csv(tmp, index=False))
    write_json(paths.SPLIT_REPORT, report)


if __name__ == "__main__":
    run(main)
