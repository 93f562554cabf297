"""Stage shortcuts: does each model read the lungs? Occlusion scores, Grad-CAM mass and the border probe.

Every trained model scores the test split intact, with the centred box that holds the lung
fields hidden, and with everything outside it hidden, scored as the evaluate stage scores it
(test-time augmentation included). The probe trained without the lungs scores the test
split with the box hidden. Scores run in fp32 with train's threads and layout.
"""

from functools import partial

from cxr import paths
from cxr.approaches import APPROACHES
from cxr.console import run
from cxr.data.preprocess import load_split
from cxr.evaluation.inference import load_trained_model
from cxr.evaluation.shortcut_occlusion import class_probabilities, neutral_grey
from cxr.evaluation.tta import ViewAveraged
from cxr.files import write_json
from cxr.params import load_params
from cxr.reporting.shortcut_audit import shortcut_audit
from cxr.reporting.shortcut_report import shortcuts_png
from cxr.training.runtime import configure_host, memory_format_of, select_device


def main() -> None:
    params = load_params()
    classes = params.data.classes
    configure_host(params.train)
    device, layout = select_device(params.train.device), memory_format_of(params.train)
    images, labels, _ = load_split(paths.PROCESSED, "test", classes)
    models = {}
    for approach in APPROACHES:
        model, _ = load_trained_model(paths.model_file(approach), classes, device, layout)
        models[approach] = (ViewAveraged(model) if approach in params.evaluate.tta else model, model)
    probe, probe_checkpoint = load_trained_model(paths.PROBE_MODEL, classes, device, layout)
    audit = shortcut_audit(
        models, probe, images, labels, classes, neutral_grey(load_split(paths.PROCESSED, "train", classes)[0]),
        params.shortcuts, partial(class_probabilities, batch_size=params.evaluate.batch_size, device=device,
                                  memory_format=layout),
        params.compare.bootstrap_resamples, params.compare.bootstrap_seed,
    )
    audit["probe"]["epochs"] = probe_checkpoint["recipe"]["epochs"]
    write_json(paths.SHORTCUTS_JSON, audit)
    shortcuts_png(audit, paths.PLOTS / "shortcuts.png")


if __name__ == "__main__":
    run(main)
