"""Stage split: patient-grouped, stratified train/val split of Data/train; Data/test as is."""

from cxr import paths
from cxr.console import run
from cxr.data.split import make_splits
from cxr.files import atomic_write
from cxr.params import load_params


def main() -> None:
    params = load_params()
    splits = make_splits(paths.RAW, params.data.classes, params.split.val_fraction, params.split.seed)
    for name, frame in splits.items():
        atomic_write(paths.SPLITS / f"{name}.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))


if __name__ == "__main__":
    run(main)
