"""Fetch the raw data set into ``data/raw`` from Kaggle, a local zip/folder or a URL.

All work happens in a temporary folder beside the destination, which is renamed into
place only after the Kaggle layout (``Data/{train,test}/<class>/``) has been checked, so
a failed or interrupted download never leaves partial data that later stages could use.
"""

from __future__ import annotations

import http.client
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from cxr.data.candidates import is_candidate_image
from cxr.errors import PipelineError, first_line

SPLITS = ("train", "test")
KaggleDownloader = Callable[[str, Path], Path]


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


def _download_url(url: str, workdir: Path) -> Path:
    target = workdir / "download.zip"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as out:
            shutil.copyfileobj(response, out)
            # http.client ends a sized body early without an error when the server hangs up.
            missing = response.length
    except (OSError, http.client.HTTPException) as err:
        raise PipelineError(f"cannot download {url}: {err}") from None
    if missing:
        raise PipelineError(f"cannot download {url}: the connection closed with {missing} bytes still to come")
    return target


def _extract_zip(archive: Path, workdir: Path) -> Path:
    destination = workdir / "unzipped"
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise PipelineError(f"{archive}: corrupt zip member {bad}")
            zf.extractall(destination)
    # Damaged member data surfaces as zlib.error or EOFError, an unsupported method (Deflate64) as NotImplementedError.
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise PipelineError(f"{archive} is not a valid zip file ({err})") from None
    return destination


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


def _materialise_local_or_url(source: str, workdir: Path, key: str = "data.source") -> Path:
    """Bring a URL's or local path's files into ``workdir`` and return the folder that holds them."""
    if source.startswith(("http://", "https://")):
        return _extract_zip(_download_url(source, workdir), workdir)
    path = Path(source).expanduser()
    if not path.exists():
        raise PipelineError(f"{key} {source!r}: no such file or folder (use kaggle, a .zip, a folder or an http(s) URL)")
    if path.is_dir():
        copy = workdir / "copied"
        shutil.copytree(path, copy)
        return copy
    if path.suffix.lower() == ".zip":
        return _extract_zip(path, workdir)
    raise PipelineError(f"{key} {source!r} is neither a folder nor a .zip file")


def _kaggle_into_workdir(fetched: Path, workdir: Path) -> Path:
    """Make the downloaded data a folder inside ``workdir``, which the final rename may move.

    Inside Kaggle and Colab notebooks ``kagglehub`` ignores ``output_dir`` and returns a
    read-only mounted folder; moving that would fail or take someone else's files, so it is copied.
    """
    if fetched.is_file() and fetched.suffix == ".zip":
        return _extract_zip(fetched, workdir)
    if not fetched.is_dir() or fetched.resolve().is_relative_to(workdir.resolve()):
        return fetched
    copy = workdir / "copied"
    shutil.copytree(fetched, copy)
    return copy


def install_source(
    source: str,
    kaggle_handle: str,
    destination: Path,
    locate: Callable[[Path], Path],
    kaggle: KaggleDownloader = kagglehub_download,
    key: str = "data.source",
) -> Path:
    """Fetch ``source`` and atomically install, as ``destination``, the folder ``locate`` picks (and checks) in it.

    ``source`` is ``kaggle`` (then ``kaggle_handle`` is downloaded), a local .zip or folder, or an
    http(s) URL of a zip; ``key`` names the param in error messages. Shared by the training data
    (``data.source``) and the external test sets, so both are fetched and checked the same way.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=f".{destination.name}-") as tmp:
        workdir = Path(tmp)
        if source == "kaggle":
            fetched = _kaggle_into_workdir(kaggle(kaggle_handle, workdir), workdir)
        else:
            fetched = _materialise_local_or_url(source, workdir, key)
        root = locate(fetched)
        staged = workdir / "staged"
        root.rename(staged)
        if destination.exists():
            shutil.rmtree(destination)
        staged.rename(destination)
    return destination


def fetch_dataset(
    source: str,
    kaggle_handle: str,
    classes: Sequence[str],
    destination: Path,
    kaggle: KaggleDownloader = kagglehub_download,
) -> Path:
    """Fetch ``source`` and atomically install its ``Data`` root as ``destination``."""

    def data_root(fetched: Path) -> Path:
        root = find_data_root(fetched)
        check_layout(root, classes)
        return root

    return install_source(source, kaggle_handle, destination, data_root, kaggle)
