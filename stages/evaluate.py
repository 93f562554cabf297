"""Stage evaluate@<approach>: test-set predictions and scores of one trained model."""

import argparse

from cxr import paths
from cxr.cli import run
from cxr.evaluation import classification_metrics, predict_split
from cxr.files import atomic_write, write_json
from cxr.params import APPROACHES, load_params
from cxr.runtime import select_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("approach", choices=APPROACHES)
    approach = parser.parse_args().approach
    params = load_params()
    classes = params.data.classes
    predictions, _ = predict_split(
        paths.model_file(approach), paths.PROCESSED, "test", classes, params.evaluate.batch_size,
        select_device(params.train.device),
    )
    atomic_write(paths.predictions_file(approach), lambda tmp: predictions.to_csv(tmp, index=False))
    write_json(paths.metrics_file(approach), classification_metrics(predictions["label"], predictions["predicted"], classes))


if __name__ == "__main__":
    run(main)
