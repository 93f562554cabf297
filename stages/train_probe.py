"""Stage train_probe: the border probe, the custom CNN trained and validated with the lung fields hidden.

Its test score (in the shortcuts stage) is how much of the task can be solved without seeing
the lungs: the data set's shortcut ceiling.
"""

from functools import partial

from cxr import paths
from cxr.console import run
from cxr.data.preprocess import load_split, save_split
from cxr.evaluation.occlusion import neutral_grey, occluded
from cxr.params import load_params
from cxr.training.loop import train_approach


def main() -> None:
    params = load_params()
    classes, audit = params.data.classes, params.shortcuts
    fill = neutral_grey(load_split(paths.PROCESSED, "train", classes)[0])
    for split in ("train", "val", "test"):
        images, _, rows = load_split(paths.PROCESSED, split, classes)
        save_split(paths.PROBE_DATA, split, images, rows,
                   transform=partial(occluded, view="center_hidden", fraction=audit.center_fraction, fill=fill))
    recipe = params.train_custom.model_copy(update={"epochs": audit.probe_epochs, "border": "keep"})
    train_approach("custom", params.model_copy(update={"train_custom": recipe}), paths.PROBE_DATA,
                   paths.PROBE_MODEL, paths.live_dir("probe"), resume_path=paths.resume_file("probe"))


if __name__ == "__main__":
    run(main)
