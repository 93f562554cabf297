"""Stages train_custom, train_extract, train_finetune: ``python stages/train.py <approach>``."""

import argparse
import logging

from cxr import paths
from cxr.approaches import APPROACHES
from cxr.console import run
from cxr.params import load_params
from cxr.training.loop import train_approach


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("approach", choices=APPROACHES)
    approach = parser.parse_args().approach
    summary = train_approach(
        approach, load_params(), paths.PROCESSED, paths.model_file(approach), paths.live_dir(approach),
        resume_path=paths.resume_file(approach),
    )
    logging.getLogger("train").info("%s: best epoch %s, summary %s", approach, summary["epoch"], summary)


if __name__ == "__main__":
    run(main)
