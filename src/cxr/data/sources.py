"""What ``data.source`` and each ``external`` set name, resolved and checked before anything is deleted or written.

A source is one of:

* ``kaggle`` (``data.source`` only): the Kaggle data set ``data.kaggle_handle``;
* ``kaggle:owner/dataset`` or ``kaggle:owner/dataset/versions/N``: that Kaggle data set;
* an ``https://`` URL of a zip; plain ``http://`` only with the file's hash pinned as pip
  pins one, ``http://host/x.zip#sha256=<64 hex digits>`` (a pin is allowed on https too);
* a local ``.zip`` file or folder. A path that does not exist is an error, never a Kaggle guess.

A local source is refused when it lies inside one of the pipeline's own output folders (they
are cleared and rewritten, so the user's files would be deleted) or when it holds the folder the
data set is installed into (``""``, ``.``, ``~``, the project root: copying it would copy the
copy into itself). The limits below bound what a source may unpack to; see :class:`SourceLimits`.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cxr import paths
from cxr.errors import PipelineError

KAGGLE = "kaggle"
KAGGLE_PREFIX = "kaggle:"
KAGGLE_HANDLE = re.compile(r"^[\w.-]+/[\w.-]+(/versions/\d+)?$")
URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
SHA256_PIN = re.compile(r"^sha256=([0-9a-fA-F]{64})$")

PIPELINE_OUTPUTS = (
    paths.RAW, paths.SPLITS, paths.AUDITED, paths.PROCESSED, paths.VAL_PREDICTIONS, paths.PROBE_DATA,
    paths.EXTERNAL_DATA, paths.MODELS, paths.METRICS, paths.REPORTS, paths.PLOTS, paths.LIVE,
)
"""Folders (relative to the project root) that stages write, clear or DVC replaces: the top folders of
every ``outs`` entry in ``dvc.yaml`` (tests/test_bad_inputs.py checks that none is missing)."""

MAX_UNPACKED_BYTES = 64 * 2**30
"""Largest size a zip may unpack to, and a download may have. The Kaggle set unpacks to about 2.3 GB;
NIH ChestX-ray14, the largest chest film set in common use (112,120 PNGs), to about 45 GB. A zip that
claims more than 64 GiB is not a chest film set of a size this pipeline decodes into memory, or it is
a decompression bomb."""

MAX_ZIP_ENTRIES = 500_000
"""Most members a zip may hold: four times NIH ChestX-ray14's 112,120 images plus their folders. Each
member is a file created on disk, so millions of tiny ones exhaust inodes long before the byte cap."""

MAX_COMPRESSION_RATIO = 100
"""Largest unpacked/packed ratio of a zip member bigger than :data:`RATIO_FLOOR_BYTES`. JPEG and PNG
do not compress further (ratio about 1), DICOM and CSV about 2-10x; deflate reaches its ceiling of
about 1,000x only on repetitive filler, the mark of a zip bomb."""

RATIO_FLOOR_BYTES = 2**20
"""Members up to 1 MiB are exempt from the ratio cap: a small blank mask or text file may compress
100x and is harmless."""

SPARE_DISK_BYTES = 2**30
"""Free space left over after unpacking or copying, so the rest of the pipeline and the system still
have room (the free-disk check refuses a source that would leave less)."""

DOWNLOAD_DEADLINE_S = 6 * 3600.0
"""Total time a URL download may take, however the server trickles: 45 GB at 2.5 MB/s takes 5 hours;
a download past 6 hours is better done by hand (then point the source at the .zip)."""


@dataclass(frozen=True)
class SourceLimits:
    """Caps on one source (module constants by default; tests pass small ones)."""

    max_bytes: int = MAX_UNPACKED_BYTES
    max_entries: int = MAX_ZIP_ENTRIES
    max_ratio: float = MAX_COMPRESSION_RATIO
    deadline_s: float = DOWNLOAD_DEADLINE_S


DEFAULT_LIMITS = SourceLimits()


@dataclass(frozen=True)
class Source:
    """A resolved source: ``kind`` is ``kaggle``, ``url``, ``zip`` or ``folder``; ``key`` names its param."""

    kind: str
    key: str
    text: str
    handle: str = ""
    url: str = ""
    sha256: str | None = None
    path: Path | None = None

    @property
    def shown(self) -> str:
        """The source as messages and outputs show it: a URL without credentials or query values."""
        if self.kind == "kaggle":
            return f"{KAGGLE_PREFIX}{self.handle}"
        return shown_source(self.text)


def shown_source(source: str) -> str:
    """A source as messages and outputs show it: a URL redacted by :func:`redact_url`, anything else as written."""
    return redact_url(source) if URL_SCHEME.match(source) else source


def redact_url(url: str) -> str:
    """``url`` with ``user:password@`` and every query value replaced by ``***`` (the sha256 pin kept).

    A query often carries an access token (presigned S3 and GCS links, Azure SAS ``sig=``), so its
    values are hidden whatever their names; the keys stay, to tell links apart.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(f"{item.partition('=')[0]}=***" if "=" in item else "***" for item in parts.query.split("&") if item)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> list[str]:
    """Substrings of ``url`` that must not reach a message: its password, its user info and query values."""
    parts = urlsplit(url)
    found = [parts.query] if parts.query else []
    if "@" in parts.netloc:
        found.append(parts.netloc.rpartition("@")[0])
    found += [parts.password or "", *(item.partition("=")[2] or item for item in parts.query.split("&"))]
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def usage(external: bool) -> str:
    kaggle = "kaggle:owner/dataset" if external else "kaggle"
    return f"use {kaggle}, a .zip, a folder or an https URL"


def resolve_source(source: str, key: str, destination: Path, kaggle_handle: str | None = None,
                   project: Path | None = None) -> Source:
    """Parse and check ``source`` (the value of param ``key``) before anything is written.

    ``kaggle_handle`` is what a bare ``kaggle`` means (``None``: not allowed, as for external sets);
    ``project`` is the folder whose :data:`PIPELINE_OUTPUTS` are protected (default: the working
    directory, where the stages run). Raises :class:`PipelineError` with one line naming ``key``.
    """
    external = kaggle_handle is None
    if not source.strip():
        raise PipelineError(f"{key} is empty; {usage(external)}")
    if source == KAGGLE:
        if not kaggle_handle:
            raise PipelineError(f"{key} is 'kaggle'; write the Kaggle data set as kaggle:owner/dataset "
                                "(or kaggle:owner/dataset/versions/N)")
        return Source("kaggle", key, source, handle=kaggle_handle)
    if source.startswith(KAGGLE_PREFIX):
        handle = source[len(KAGGLE_PREFIX):]
        if not KAGGLE_HANDLE.match(handle):
            raise PipelineError(f"{key} {source!r}: not a Kaggle handle; write kaggle:owner/dataset or "
                                "kaggle:owner/dataset/versions/N")
        return Source("kaggle", key, source, handle=handle)
    if URL_SCHEME.match(source):
        return _url_source(source, key)
    return _local_source(source, key, Path(destination), external, project)


def _url_source(source: str, key: str) -> Source:
    try:
        parts = urlsplit(source)
        shown = redact_url(source)
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError as err:
        raise PipelineError(f"{key}: not a valid URL ({err})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise PipelineError(f"{key} {shown!r}: unsupported URL scheme {scheme}:// (use an https URL, or download the file "
                            "and give its path)")
    sha256 = None
    if parts.fragment:
        pin = SHA256_PIN.match(parts.fragment)
        if pin is None:
            raise PipelineError(f"{key} {shown!r}: the part after # must be sha256=<64 hex digits> (the file's SHA-256)")
        sha256 = pin.group(1).lower()
    if not parts.hostname:
        raise PipelineError(f"{key} {shown!r}: no host in the URL")
    if scheme == "http" and sha256 is None:
        raise PipelineError(f"{key} {shown!r}: plain http can be altered on the way; use https, or pin the file with "
                            "#sha256=<its 64 hex digits> at the end of the URL")
    url = urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))
    return Source("url", key, source, url=url, sha256=sha256)


def _local_source(source: str, key: str, destination: Path, external: bool, project: Path | None) -> Source:
    path = Path(source).expanduser()
    if not path.exists():
        if path.is_symlink():
            raise PipelineError(f"{key} {source!r}: a broken symbolic link (its target does not exist)")
        hint = f"for a Kaggle data set write kaggle:{source}; " if external and KAGGLE_HANDLE.match(source) else ""
        raise PipelineError(f"{key} {source!r}: no such file or folder ({hint}{usage(external)})")
    resolved = path.resolve()
    check_location(resolved, key, source, destination, Path.cwd() if project is None else project)
    if resolved.is_dir():
        return Source("folder", key, str(path), path=resolved)
    if path.suffix.lower() == ".zip" and resolved.is_file():
        return Source("zip", key, str(path), path=resolved)
    raise PipelineError(f"{key} {source!r} is neither a folder nor a .zip file")


def check_location(path: Path, key: str, source: str, destination: Path, project: Path) -> None:
    """Refuse a resolved local ``path`` that holds ``destination`` or lies in a folder the pipeline writes."""
    root = project.resolve()
    for output in PIPELINE_OUTPUTS:
        folder = (root / output).resolve()
        if path == folder or path.is_relative_to(folder):
            raise PipelineError(f"{key} {source!r} is inside {output.as_posix()}/, which the pipeline clears and rewrites; "
                                "move the data set out of the project's output folders")
    target = destination.resolve()
    if target.is_relative_to(path):
        raise PipelineError(f"{key} {source!r} holds {destination}, where the data is installed; point it at the data "
                            "set's own folder or .zip")
    if path.is_relative_to(target.parent) and path.relative_to(target.parent).parts[0].startswith(f".{target.name}-"):
        raise PipelineError(f"{key} {source!r} is inside a temporary folder of the pipeline, removed at the next fetch")


def project_of(destination: Path, layout: Path) -> Path:
    """The project folder that holds ``destination`` at ``layout`` (e.g. data/raw), else the working directory."""
    absolute = Path(destination).absolute()
    depth = len(layout.parts)
    if absolute.parts[-depth:] == layout.parts:
        return absolute.parents[depth - 1]
    return Path.cwd()


def human_size(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def ensure_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to write ``needed`` bytes under ``folder`` when less than that plus :data:`SPARE_DISK_BYTES` is free."""
    free = shutil.disk_usage(folder).free
    if needed + SPARE_DISK_BYTES > free:
        shown = next(p for p in (folder, *folder.parents) if not p.name.startswith("."))  # not a hidden work folder
        raise PipelineError(f"{what} needs {human_size(needed)} on disk, but {shown} has {human_size(free)} free "
                            f"(and {human_size(SPARE_DISK_BYTES)} is kept spare); free some space")
