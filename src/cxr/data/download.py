"""Fetch the raw data set into ``data/raw`` from Kaggle, a local zip/folder or an https URL.

The source is resolved and checked first (:mod:`cxr.data.sources`), before anything is deleted
or written. All work happens in a temporary folder beside the destination, which is renamed into
place only after the Kaggle layout (``Data/{train,test}/<class>/``) has been checked, so a failed
or interrupted download never leaves partial data that later stages could use; the old data is
moved aside before the new is renamed in, and deleted only after. Zips are unpacked and folders
copied by :mod:`cxr.data.unpack`, URLs downloaded by :mod:`cxr.data.fetch_url`.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from cxr import paths
from cxr.data.candidates import is_candidate_image
from cxr.data.fetch_url import download_url
from cxr.data.sources import DEFAULT_LIMITS, Source, SourceLimits, project_of, resolve_source
from cxr.data.unpack import copy_folder, extract_zip
from cxr.errors import PipelineError, first_line

SPLITS = ("train", "test")
KaggleDownloader = Callable[[str, Path], Path]
WORKDIR_NAME = re.compile(r"[0-9a-f]{8}")  # the random part of a work folder's name (secrets.token_hex(4))
PREVIOUS = "previous"  # the old destination, inside the work folder between the two renames of an install


def kagglehub_download(handle: str, workdir: Path) -> Path:
    """Download a Kaggle dataset with ``kagglehub`` (public datasets need no credentials).

    ``kagglehub`` is imported here, not at module level, so importing this module never
    touches the network or Kaggle's credential checks.
    """
    import kagglehub
    from kagglehub.exceptions import DataCorruptionError, KaggleApiHTTPError

    try:
        return Path(kagglehub.dataset_download(handle, output_dir=str(workdir / "kaggle"), force_download=True))
    except KaggleApiHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise PipelineError(
                f"Kaggle refused access to {handle} (HTTP {status}): set KAGGLE_API_TOKEN, or KAGGLE_USERNAME and "
                "KAGGLE_KEY, or put kaggle.json in ~/.kaggle/ (https://www.kaggle.com/settings/api)"
            ) from None
        raise PipelineError(f"Kaggle download of {handle} failed: {first_line(err)}") from None
    except ValueError as err:
        raise PipelineError(
            f"Kaggle download of {handle} failed: {first_line(err)}; check data.kaggle_handle "
            "(owner/dataset or owner/dataset/versions/N)"
        ) from None
    except DataCorruptionError:
        raise PipelineError(f"Kaggle download of {handle} was corrupted (checksum mismatch); run it again") from None
    except OSError as err:
        raise PipelineError(
            f"cannot reach Kaggle to download {handle} ({type(err).__name__}: {err}); check the network, or set "
            "data.source to a local .zip or folder"
        ) from None


def find_data_root(folder: Path) -> Path:
    """Locate the ``Data`` folder (``train`` + ``test`` inside), allowing extra wrapping folders.

    Zips re-packed by users often add a top folder (``archive/Data/...``); accept any depth
    up to three, but exactly one candidate, so two different data sets are never mixed.
    """
    candidates = [folder] + [
        p
        for depth in ("*", "*/*", "*/*/*")
        for p in folder.glob(depth)
        if p.is_dir() and "__MACOSX" not in p.parts
    ]
    roots = [p for p in candidates if (p / "train").is_dir() or (p / "test").is_dir()]
    if not roots:
        raise PipelineError(
            f"{folder}: no Data/train or Data/test folder found (expected Kaggle layout Data/{{train,test}}/<class>/)"
        )
    if len(roots) > 1:
        names = ", ".join(str(r.relative_to(folder)) for r in roots[:3])
        raise PipelineError(f"{folder}: several data roots found ({names}); keep exactly one Data/ folder")
    return roots[0]


def check_layout(root: Path, classes: Sequence[str]) -> None:
    """Reject a data root whose splits or class folders are missing, unknown or empty."""
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise PipelineError(f"{root}: missing folder {split}/ (expected {', '.join(SPLITS)})")
        present = {p.name for p in split_dir.iterdir() if p.is_dir()}
        unknown = sorted(present - set(classes))
        if unknown:
            raise PipelineError(f"{split_dir}: unknown class folder {unknown[0]!r}; expected only {', '.join(classes)}")
        for name in classes:
            class_dir = split_dir / name
            if name not in present:
                raise PipelineError(f"{split_dir}: missing class folder {name}/")
            if not any(is_candidate_image(p) for p in class_dir.iterdir()):
                raise PipelineError(f"{class_dir}: class folder is empty")


def _materialise(source: Source, workdir: Path, kaggle: KaggleDownloader, limits: SourceLimits) -> Path:
    """Bring the source's files into ``workdir`` and return the folder that holds them."""
    if source.kind == "kaggle":
        return _kaggle_into_workdir(kaggle(source.handle, workdir), workdir, source.key, limits)
    if source.kind == "url":
        archive = download_url(source, workdir / "download.zip", limits)
        return extract_zip(archive, workdir / "unzipped", source.shown, limits)
    assert source.path is not None
    if source.kind == "zip":
        return extract_zip(source.path, workdir / "unzipped", source.shown, limits)
    return copy_folder(Path(source.text), workdir / "copied", source.key)


def _kaggle_into_workdir(fetched: Path, workdir: Path, key: str, limits: SourceLimits) -> Path:
    """Make the downloaded data a folder inside ``workdir``, which the final rename may move.

    Inside Kaggle and Colab notebooks ``kagglehub`` ignores ``output_dir`` and returns a
    read-only mounted folder; moving that would fail or take someone else's files, so it is copied.
    """
    if fetched.is_file() and fetched.suffix == ".zip":
        return extract_zip(fetched, workdir / "unzipped", str(fetched), limits)
    if not fetched.is_dir() or fetched.resolve().is_relative_to(workdir.resolve()):
        return fetched
    return copy_folder(fetched, workdir / "copied", key)


def clear_stale_workdirs(destination: Path) -> None:
    """Remove the work folders a killed fetch left beside ``destination`` (``.<name>-<8 hex>``).

    A run killed between moving the old data aside and renaming the new data in leaves no
    ``destination`` but the old data in its work folder: that is put back first.
    """
    for stale in sorted(destination.parent.glob(f".{glob.escape(destination.name)}-*")):
        if not WORKDIR_NAME.fullmatch(stale.name.removeprefix(f".{destination.name}-")) or stale.is_symlink():
            continue
        previous = stale / PREVIOUS
        if previous.is_dir() and not os.path.lexists(destination):
            previous.rename(destination)
        shutil.rmtree(stale, ignore_errors=True)


def _swap_in(root: Path, workdir: Path, destination: Path) -> None:
    """Install ``root`` as ``destination``: old data moved aside, new renamed in, old deleted with ``workdir``."""
    staged = workdir / "staged"
    root.rename(staged)
    if os.path.lexists(destination):
        destination.rename(workdir / PREVIOUS)
    staged.rename(destination)


def install_source(
    source: str | Source,
    kaggle_handle: str | None,
    destination: Path,
    locate: Callable[[Path], Path],
    kaggle: KaggleDownloader = kagglehub_download,
    key: str = "data.source",
    limits: SourceLimits = DEFAULT_LIMITS,
    project: Path | None = None,
) -> Path:
    """Fetch ``source`` and atomically install, as ``destination``, the folder ``locate`` picks (and checks) in it.

    ``source`` is a resolved :class:`~cxr.data.sources.Source`, or a param value resolved here (see
    :func:`~cxr.data.sources.resolve_source`: ``kaggle`` means ``kaggle_handle``; ``key`` names the param
    in error messages; ``project`` is the folder whose output folders are protected). Shared by the
    training data (``data.source``) and the external test sets, so both are fetched and checked the
    same way. The work happens in ``.<destination name>-<8 hex>`` beside ``destination``, removed
    afterwards, and by the next fetch if this one is killed.
    """
    destination = Path(destination)
    if isinstance(source, str):
        source = resolve_source(source, key, destination, kaggle_handle, project)
    destination.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_workdirs(destination)
    workdir = destination.parent / f".{destination.name}-{secrets.token_hex(4)}"
    workdir.mkdir()
    try:
        fetched = _materialise(source, workdir, kaggle, limits)
        try:
            root = locate(fetched)
        except PipelineError as err:  # name the user's source, not the work folder deleted below
            raise PipelineError(str(err).replace(str(fetched), source.shown)) from None
        _swap_in(root, workdir, destination)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return destination


def fetch_dataset(
    source: str,
    kaggle_handle: str,
    classes: Sequence[str],
    destination: Path,
    kaggle: KaggleDownloader = kagglehub_download,
    limits: SourceLimits = DEFAULT_LIMITS,
) -> Path:
    """Fetch ``source`` (the value of ``data.source``) and atomically install its ``Data`` root as ``destination``."""

    def data_root(fetched: Path) -> Path:
        root = find_data_root(fetched)
        check_layout(root, classes)
        return root

    project = project_of(destination, paths.RAW)
    return install_source(source, kaggle_handle, destination, data_root, kaggle, limits=limits, project=project)
