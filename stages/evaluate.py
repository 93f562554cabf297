"""Stage evaluate@<approach>: test scores, predictions, confusion matrix and Grad-CAM gallery of one model.

Validation predictions are written too: the compare stage fits temperature scaling and
ensemble weights on them, never on the test set. Approaches listed in ``evaluate.tta`` are
scored on both splits with test-time augmentation; Grad-CAM shows, on the image as it is,
why the model favours the class those predictions give. Scores are computed in full fp32
whatever ``train.amp`` says, so a test result does not depend on the device's precision;
threads, memory reuse and layout come from ``train`` (speed only). The ``groups`` CSV, when set,
is checked again here (split checked it first) and its match rate against the test images
logged, rather than only in compare, the last stage.
"""

import argparse

from cxr import paths
from cxr.approaches import APPROACHES, DISPLAY_NAMES
from cxr.console import run
from cxr.data.groups import load_groups, log_matches
from cxr.evaluation.inference import load_trained_model, predict_split
from cxr.evaluation.saliency import misclassified
from cxr.evaluation.tta import ViewAveraged
from cxr.files import atomic_write, write_json
from cxr.params import load_params
from cxr.reporting.figures import confusion_png
from cxr.reporting.saliency_gallery import gradcam_gallery
from cxr.reporting.scores import classification_metrics
from cxr.training.runtime import configure_host, memory_format_of, select_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("approach", choices=APPROACHES)
    approach = parser.parse_args().approach
    params = load_params()
    classes, grouping = params.data.classes, params.grouping
    groups = None if grouping is None else load_groups(grouping)  # a broken CSV stops here, before any scoring
    configure_host(params.train)
    device, layout = select_device(params.train.device), memory_format_of(params.train)
    model, checkpoint = load_trained_model(paths.model_file(approach), classes, device, layout)
    scored = ViewAveraged(model) if approach in params.evaluate.tta else model
    predict = {"model": scored, "checkpoint": checkpoint, "processed_dir": paths.PROCESSED, "classes": classes,
               "batch_size": params.evaluate.batch_size, "device": device, "memory_format": layout}
    val = predict_split(split="val", **predict)
    test = predict_split(split="test", **predict)
    if groups is not None:
        log_matches(grouping, groups, test.table["path"])

    atomic_write(paths.val_predictions_file(approach), lambda tmp: val.table.to_csv(tmp, index=False))
    atomic_write(paths.predictions_file(approach), lambda tmp: test.table.to_csv(tmp, index=False))
    write_json(paths.metrics_file(approach), classification_metrics(test.table["label"], test.table["predicted"], classes))
    atomic_write(paths.misclassified_file(approach), lambda tmp: misclassified(test.table, classes).to_csv(tmp, index=False))
    plots = paths.evaluation_plots(approach)
    confusion_png(test.table, classes, f"{DISPLAY_NAMES[approach]}: test confusion matrix", plots / "confusion.png")
    gradcam_gallery(model.cpu(), test.images, test.table, classes, params.evaluate.gradcam_per_class,
                    f"{DISPLAY_NAMES[approach]}: Grad-CAM on test images", plots / "gradcam.png")


if __name__ == "__main__":
    run(main)
