"""Shared fixtures: tiny synthetic Kaggle-layout data sets, and a guard against network access in every process.

``make_kaggle_tree``, ``make_kaggle_zip`` and ``make_bad_data_set`` are plain functions (importable
with ``from conftest import make_kaggle_tree, ...``) so tests can vary the data set; the
``kaggle_tree`` and ``kaggle_zip`` fixtures wrap them with the defaults, and ``reproduced_mini`` is
the session's one fully reproduced pipeline project.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr.data.preprocess import save_split

CLASSES = ("COVID19", "NORMAL", "PNEUMONIA")

_CLASS_LOOK = {
    # class: (mean grey level, stripe orientation); unknown classes get a mid grey without stripes
    "COVID19": (70, "rows"),
    "NORMAL": (180, None),
    "PNEUMONIA": (120, "columns"),
}
_TEST_PATIENT_OFFSET = 1000


OFFLINE = Path(__file__).resolve().parent / "offline"
sys.path.insert(0, str(OFFLINE))
from network_guard import LOG_VARIABLE, guarded  # noqa: E402  (needs OFFLINE on sys.path)


def pytest_configure(config: pytest.Config) -> None:
    """Give every process the tests start the network guard, a log of refused attempts and a hermetic DVC.

    ``sitecustomize`` in ``tests/offline`` installs the guard in each new Python process. DVC's
    global and system config point at an empty folder whose config turns the update check
    off (it would start a daemon that tries to reach the network), so a developer's own DVC
    settings never leak into a test either.
    """
    session = Path(tempfile.mkdtemp(prefix="cxr-tests-"))
    (session / "dvc").mkdir()
    (session / "dvc" / "config").write_text("[core]\n    check_update = false\n")
    (session / "network.log").touch()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(OFFLINE), os.environ.get("PYTHONPATH")]))
    os.environ[LOG_VARIABLE] = str(session / "network.log")
    os.environ["DVC_GLOBAL_CONFIG_DIR"] = os.environ["DVC_SYSTEM_CONFIG_DIR"] = str(session / "dvc")
    os.environ["DVC_NO_ANALYTICS"] = "1"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse non-loopback connections in this process; fail the test if it, or any process it started, tried one."""
    guarded(monkeypatch.setattr)
    log = Path(os.environ[LOG_VARIABLE])
    seen = log.stat().st_size
    yield
    with log.open(encoding="utf-8") as handle:
        handle.seek(seen)
        attempts = handle.read().strip()
    if attempts:
        pytest.fail(f"a process started by this test tried to reach the network:\n{attempts}")


@pytest.fixture
def own_network_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A log of refused attempts for one test alone: a test that goes offline on purpose reads its own."""
    log = tmp_path / "network.log"
    log.touch()
    monkeypatch.setenv(LOG_VARIABLE, str(log))
    return log


def _file_name(label: str, index: int, split: str) -> str:
    """Kermany-like names: PNEUMONIA images come two per patient (``personN_bacteria_M``), others are single."""
    if label == "PNEUMONIA":
        offset = _TEST_PATIENT_OFFSET if split == "test" else 0
        return f"person{offset + index // 2}_bacteria_{index}.jpeg"
    if label == "NORMAL":
        return f"IM-{index:04d}-0001.jpeg"
    return f"{label.lower()}_{index:03d}.jpg"


def _synthetic_xray(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    mean, stripes = _CLASS_LOOK.get(label, (128, None))
    pixels = np.full((size, size), float(mean))
    if stripes == "rows":
        pixels[::4, :] += 60
    elif stripes == "columns":
        pixels[:, ::4] += 60
    pixels += rng.normal(0.0, 12.0, size=(size, size))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def make_kaggle_tree(
    root: Path,
    per_class: dict[str, int] | int = 4,
    size: int = 48,
    splits: Sequence[str] = ("train", "test"),
    classes: Sequence[str] = CLASSES,
    seed: int = 0,
) -> Path:
    """Write ``root/Data/<split>/<class>/*`` of synthetic grayscale JPEGs and return ``root/Data``.

    * ``per_class``: images per class in every split; a dict gives per-class counts, and a
      class it does not name gets an empty folder (0 images).
    * ``size``: side of the square JPEGs in pixels.
    * ``splits`` / ``classes``: which split and class folders to create (any names, so
      broken layouts can be built too).
    * ``seed``: the same arguments and seed give byte-identical files.

    Pixels depend on the class (COVID19 dark with horizontal stripes, NORMAL bright and
    plain, PNEUMONIA mid-grey with vertical stripes) plus seeded noise, so a model can learn
    them. PNEUMONIA files are named ``person{n}_bacteria_{m}.jpeg`` with two images per
    patient (so a class of k images has ceil(k/2) patients; test patients are numbered from
    1000, so they never share an id with train ones); NORMAL files are ``IM-{i:04d}-0001.jpeg``
    and COVID19 files ``covid19_{i:03d}.jpg``, one patient each. Splitting with
    ``val_fraction`` needs at least ``round(1 / val_fraction)`` patients per class, e.g.
    ``per_class=4`` works with ``val_fraction=0.5`` and ``per_class=14`` with 0.15.
    """
    rng = np.random.default_rng(seed)
    data = Path(root) / "Data"
    for split in splits:
        for label in classes:
            class_dir = data / split / label
            class_dir.mkdir(parents=True, exist_ok=True)
            count = per_class.get(label, 0) if isinstance(per_class, dict) else per_class
            for index in range(count):
                image = Image.fromarray(_synthetic_xray(label, size, rng))
                image.save(class_dir / _file_name(label, index, split), format="JPEG", quality=90)
    return data


def make_kaggle_zip(tmp_path: Path, top_folder: str | None = None) -> Path:
    """Zip a default :func:`make_kaggle_tree` (entries ``Data/...``, or ``<top_folder>/Data/...``).

    Each call works in a fresh folder under ``tmp_path``, so it can be called repeatedly;
    returns the path of the ``.zip`` file.
    """
    work = Path(tempfile.mkdtemp(prefix="kaggle-zip-", dir=tmp_path))
    data = make_kaggle_tree(work / "tree")
    archive = work / "kaggle.zip"
    prefix = f"{top_folder}/" if top_folder else ""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(data.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(data.parent).as_posix())
    return archive


BAD_KINDS = ("corrupt", "empty", "truncated")


def _bad_names(split: str, label: str, group: int) -> dict[str, str]:
    """File name -> kind for one group of bad files (one file of each kind), patient-grouped where names allow."""
    if label == "PNEUMONIA":  # person<N>_..., one patient per group
        patient = (1500 if split == "test" else 500) + group
        return {f"person{patient}_bacteria_{9000 + i}.jpeg": kind for i, kind in enumerate(BAD_KINDS)}
    if label == "NORMAL":  # IM-<N>-..., one patient per group
        return {f"IM-{900 + group:04d}-{i + 1:04d}.jpeg": kind for i, kind in enumerate(BAD_KINDS)}
    return {f"bad_{kind}_{group}.jpg": kind for kind in BAD_KINDS}  # no patient in the name: one group per file


def make_bad_data_set(root: Path, per_class: int = 12, groups: int = 2) -> tuple[Path, dict[str, str]]:
    """A :func:`make_kaggle_tree` (40 px) plus ``groups`` bad files of each kind per class and folder.

    The kinds: ``corrupt`` (random bytes under a JPEG name), ``empty`` (0 bytes) and ``truncated``
    (a good JPEG of the set cut in half). In ``Data/train`` the PNEUMONIA and NORMAL ones come as one
    file of each kind per made-up patient, so the patient-grouped split moves the three kinds together.
    ``per_class`` good images (12: 6 PNEUMONIA patients) leave 4 folds after the bad ones.
    Returns the ``Data`` folder and {path relative to it (as the split tables write it): kind}.
    """
    data = make_kaggle_tree(root, per_class=per_class, size=40)
    rng = np.random.default_rng(1)
    bad = {}
    for split in ("train", "test"):
        for label in CLASSES:
            folder = data / split / label
            valid = min(folder.iterdir()).read_bytes()  # a good JPEG of this class
            for group in range(groups):
                for name, kind in _bad_names(split, label, group).items():
                    content = {
                        "corrupt": b"\x00\x07" + rng.bytes(2046),
                        "empty": b"",
                        "truncated": valid[: len(valid) // 2],
                    }[kind]
                    (folder / name).write_bytes(content)
                    bad[f"{split}/{label}/{name}"] = kind
    return data, bad


@pytest.fixture
def kaggle_tree(tmp_path: Path) -> Path:
    """A default synthetic data set; the ``Data`` folder (``tmp_path/kaggle/Data``)."""
    return make_kaggle_tree(tmp_path / "kaggle")


@pytest.fixture
def kaggle_zip(tmp_path: Path) -> Path:
    """A zip of a default synthetic data set with ``Data/`` at the top of the archive."""
    return make_kaggle_zip(tmp_path)


class Reproduced(NamedTuple):
    """A project after its first ``dvc repro``, that run's output, and the bad files of its data set."""

    project: Path
    log: str
    bad: dict[str, str]


@pytest.fixture(scope="session")
def reproduced_mini(tmp_path_factory: pytest.TempPathFactory) -> Reproduced:
    """The generated mini project after one full ``dvc repro``: 32 px arrays, one epoch per model.

    Its data set is :func:`make_bad_data_set`'s (12 good images per class and folder, plus bad files
    in every split), so this one run also shows that bad files never stop the pipeline. A full run
    trains every model and is the slow part of each DVC test, so the session runs it once: tests read
    it, and a test that changes anything works on its own ``test_pipeline.copy_project`` of it.
    """
    from test_pipeline import make_project, sh  # test_pipeline imports this module: import it here, not at the top

    root = tmp_path_factory.mktemp("mini")
    data, bad = make_bad_data_set(root / "images")
    project = make_project(root, data.parent, image_size=32, epochs=1)
    return Reproduced(project, sh(project, "dvc", "repro"), bad)


def write_processed(folder: Path, per_class: dict[str, int], size: int = 32) -> None:
    """Synthetic preprocessed splits whose classes differ in brightness, so they are learnable."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        labels = np.repeat(np.arange(len(CLASSES)), count)
        images = rng.integers(0, 60, size=(len(labels), size, size)) + labels[:, None, None] * 80
        rows = pd.DataFrame({"path": [f"{split}/{i}.jpg" for i in range(len(labels))],
                             "label": np.asarray(CLASSES)[labels], "patient": [str(i) for i in range(len(labels))]})
        save_split(folder, split, images.astype(np.uint8), rows)
