"""Stage train_probe: the border probe, the custom CNN trained and validated with the lung fields hidden.

Its test score (in the shortcuts stage) is how much of the task can be solved without seeing
the lungs: the data set's shortcut ceiling.
"""

from cxr import paths
from cxr.console import run
from cxr.evaluation.shortcut_occlusion import write_probe_splits
from cxr.params import load_params
from cxr.training.loop import train_approach


def main() -> None:
    params = load_params()
    classes, audit = params.data.classes, params.shortcuts
    write_probe_splits(paths.PROCESSED, paths.PROBE_DATA, classes, audit.center_fraction)
    recipe = params.train_custom.model_copy(update={"epochs": audit.probe_epochs, "border": "keep"})
    train_approach("custom", params.model_copy(update={"train_custom": recipe}), paths.PROBE_DATA,
                   paths.PROBE_MODEL, paths.live_dir("probe"), resume_path=paths.resume_file("probe"))


if __name__ == "__main__":
    run(main)
