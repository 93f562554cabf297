"""Stage download: fetch the data set named by ``data.source`` into data/raw."""

from cxr import paths
from cxr.console import run
from cxr.data.download import fetch_dataset
from cxr.params_core import load_data_params


def main() -> None:
    data = load_data_params()
    fetch_dataset(data.source, data.kaggle_handle, data.classes, paths.RAW)


if __name__ == "__main__":
    run(main)
