"""Turn one image file into the pipeline's pixels: a square 8-bit grayscale array.

Every stage that reads pixels (preprocess over thousands of files in worker processes, and
``cxr-predict`` on a user's own files, DICOM included) goes through :func:`decode_grayscale`,
so training and prediction see identically decoded images. Any problem with a file surfaces
as one :class:`~cxr.errors.ImageDecodeError` line naming the file, never as a traceback from
inside PIL or pydicom: whatever PIL raises while parsing a header (a corrupt PNG header, a
metadata chunk over PIL's own ``PngImagePlugin.MAX_TEXT_CHUNK`` / ``MAX_TEXT_MEMORY`` limits)
becomes a reason, and a DICOM header is checked (Rows, Columns, BitsAllocated,
SamplesPerPixel, NumberOfFrames, PhotometricInterpretation) before any pixel is decoded, so
the message says which element is wrong.

Choices worth knowing:

* Alpha is dropped (the colour channels are used as stored, not composited onto a
  background): X-rays with transparency are rare and the stored grey values are the signal.
* High-bit-depth images (16-bit PNG/TIFF, float TIFF) are stretched from their own minimum
  to their own maximum, because 12-bit data stored in 16-bit containers would otherwise come
  out nearly black. A float image with a NaN or infinite pixel is rejected, not stretched into
  a black image.
* The whole image is resized to ``size x size`` (aspect ratio not preserved) with bilinear
  resampling; JPEGs are decoded at a reduced DCT scale first when they are much larger than
  the target, which makes big JPEGs several times faster to read.
* ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default ``False`` so a truncated file
  raises instead of being silently padded with grey.
* Multi-frame DICOM files show their first frame, and only that frame is decoded
  (``pydicom.pixels.pixel_array(..., index=0)``): with the usual uncompressed transfer
  syntaxes only that frame's bytes are read from the file.

Memory per image is bounded in bytes, not in pixels alone. Chest films need about 20 Mpx at
most; an image is refused before its pixels are decoded when it has more than
:data:`MAX_PIXELS` pixels, or when ``pixels x (2 x stored bytes per pixel + 1)`` exceeds
:data:`MAX_DECODE_BYTES` (256 MiB). That product is the peak this module holds per image: the
decoded pixels as the library stores them (PIL keeps 1 byte per pixel for ``L``/``P``/``1``,
2 for 16-bit, 4 for 32-bit and every multi-band mode; DICOM keeps samples x bytes allocated),
one working copy of the same size (PIL's conversion, or NumPy's view of a 16/32-bit image),
and the 8-bit result. High-bit-depth and DICOM pixels are converted :data:`_BLOCK_PIXELS` at a
time, adding at most about 16 MB (float64 copies of one block) whatever the image size. So a
16-bit 3000 x 3000 PNG peaks at about 9 Mpx x 5 B = 45 MB + 16 MB, and no image goes over
256 MiB + 16 MB, per decoding worker. A Deflated-transfer-syntax DICOM is inflated whole by
pydicom, which then copies its pixel data: it is measured first (inflated chunk by chunk,
nothing kept) and refused when that would exceed ``MAX_DECODE_BYTES`` too.
"""

import logging
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian

from cxr.errors import ImageDecodeError, first_line

MAX_PIXELS = 50_000_000
"""Largest width x height accepted: two and a half times the largest chest film; bigger files
are almost surely not chest X-rays and could exhaust a worker's memory while decoding."""

MAX_DECODE_BYTES = 256 * 1024 * 1024
"""Largest ``pixels x (2 x stored bytes per pixel + 1)`` accepted: the memory one image may
take while it is decoded and converted (see the module docstring)."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"})
"""Lower-case suffixes that ``cxr-predict`` picks up when it scans a folder."""

_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_ALPHA_DROPPING_MODES = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L", "PA": "P"}
_RESIZE_REDUCING_GAP = 3.0
_BLOCK_PIXELS = 1 << 18
"""Pixels converted at a time from high-bit-depth and DICOM data: a few float64 copies of one
block (2 MB each) instead of the whole image."""
_FORMAT_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_DICOM_PHOTOMETRIC_SAMPLES = {
    "MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3,
    "YBR_FULL_422": 3, "YBR_PARTIAL_420": 3, "YBR_ICT": 3, "YBR_RCT": 3,
}
_DICOM_BITS_ALLOCATED = (1, 8, 16, 32)

# pydicom warns, and logs, about each malformed element it tolerates, and PIL warns about corrupt
# metadata it skips; the decoder reports what matters as its own one-line reason, so on a user's
# terminal these would only repeat it.
warnings.filterwarnings("ignore", module=r"pydicom\.")
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
logging.getLogger("pydicom").propagate = False


class _NonFinitePixels(ValueError):
    """Pixel values that are NaN or infinite, which no grey scale can show."""


def decode_grayscale(path: Path, size: int) -> np.ndarray:
    """Decode ``path`` to a writable ``uint8`` array of shape ``(size, size)``.

    Raises :class:`ImageDecodeError` (one line naming the file) for anything that is not a
    decodable image: missing, unreadable, empty, truncated, too large, or not an image.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            gray = _decode_stream(stream, path, size)
    except OSError as exc:
        raise _decode_error(path, _describe_os_error(exc)) from exc
    return _resize(gray, size)


def decode_or_reason(path: Path, size: int) -> np.ndarray | str:
    """:func:`decode_grayscale`, or the one-line message (``"<path>: <reason>"``) saying why not.

    The one helper behind every stage that skips bad files instead of stopping (preprocess,
    external, ``cxr-predict``): a failure is a value to report, and any other exception is a bug.
    """
    try:
        return decode_grayscale(path, size)
    except ImageDecodeError as err:
        return str(err)


def _decode_stream(stream: BinaryIO, path: Path, size: int) -> Image.Image:
    """Pick the decoder by content, not by name, so misnamed files still decode.

    DICOM is recognised by its ``DICM`` magic; a ``.dcm`` file that PIL does not recognise
    either is tried as a preamble-less (ACR-NEMA style) DICOM file as a last resort.
    """
    header = stream.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
    if not header:
        raise _decode_error(path, "empty file")
    stream.seek(0)
    if header[_DICOM_MAGIC_OFFSET:] == _DICOM_MAGIC:
        return _decode_dicom(stream, path, has_magic=True)
    image = _open_with_pil(stream, path, header)
    if image is not None:
        return _load_with_pil(image, path, size)
    if path.suffix.lower() == ".dcm":
        stream.seek(0)
        return _decode_dicom(stream, path, has_magic=False)
    raise _decode_error(path, _not_an_image_problem(header))


def _decode_error(path: Path, problem: str) -> ImageDecodeError:
    one_line_problem = " ".join(problem.split())
    return ImageDecodeError(f"{path}: {one_line_problem}")


def _describe_os_error(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    return f"cannot read file ({exc.strerror or exc})"


def _check_size(path: Path, width: int, height: int, stored_bytes_per_pixel: int) -> None:
    """Refuse an image before decoding it when it has no pixels or would take too much memory."""
    pixels = width * height
    if pixels < 1:
        raise _decode_error(path, f"image has no pixels ({width}x{height})")
    if pixels > MAX_PIXELS:
        raise _decode_error(path, (
            f"image too large ({width}x{height} = {pixels:,} pixels; "
            f"the limit is MAX_PIXELS = {MAX_PIXELS:,} pixels)"
        ))
    needed = pixels * (2 * stored_bytes_per_pixel + 1)
    if needed > MAX_DECODE_BYTES:
        raise _decode_error(path, (
            f"image too large to decode ({width}x{height} at {stored_bytes_per_pixel} bytes per pixel "
            f"needs {needed:,} bytes; the limit is MAX_DECODE_BYTES = {MAX_DECODE_BYTES:,} bytes)"
        ))


def _not_an_image_problem(header: bytes) -> str:
    if header.startswith(b"version https://git-lfs"):
        return "not an image (a Git LFS pointer file; fetch the real file with `git lfs pull`)"
    if _is_probably_text(header):
        return "not an image (the file contains text)"
    return "not an image (unrecognised file format)"


def _is_probably_text(header: bytes) -> bool:
    """Binary formats have control bytes near the start; text (HTML, CSV, ...) does not."""
    return all(byte >= 0x20 or byte in b"\t\n\r\f" for byte in header)


def _open_with_pil(stream: BinaryIO, path: Path, header: bytes) -> Image.Image | None:
    """Read just the header; ``None`` when PIL does not recognise the format."""
    with warnings.catch_warnings():
        # Our own MAX_PIXELS check replaces PIL's softer decompression-bomb warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(stream)
        except UnidentifiedImageError:
            return None
        except Image.DecompressionBombError as exc:
            problem = f"image too large (the limit is MAX_PIXELS = {MAX_PIXELS:,} pixels)"
            raise _decode_error(path, problem) from exc
        # PIL's format plugins report a malformed header with many unrelated exception types.
        except Exception as exc:
            raise _decode_error(path, _pil_header_problem(exc, header)) from exc


def _pil_header_problem(exc: Exception, header: bytes) -> str:
    kind = next((name for magic, name in _FORMAT_MAGIC.items() if header.startswith(magic)), "image")
    return _pil_limit_problem(exc) or f"corrupt {kind} header ({first_line(exc)})"


def _pil_limit_problem(exc: Exception) -> str | None:
    """The reason when PIL refused a PNG text/ICC chunk over its own limits, which it reports as ValueError."""
    message = str(exc)
    if "MAX_TEXT_CHUNK" in message:
        limit = PngImagePlugin.MAX_TEXT_CHUNK
        return f"a metadata chunk over PIL's limit (PngImagePlugin.MAX_TEXT_CHUNK = {limit:,} bytes decompressed)"
    if "MAX_TEXT_MEMORY" in message:
        limit = PngImagePlugin.MAX_TEXT_MEMORY
        return f"metadata chunks over PIL's limit (PngImagePlugin.MAX_TEXT_MEMORY = {limit:,} bytes in all)"
    return None


def _load_with_pil(image: Image.Image, path: Path, size: int) -> Image.Image:
    """Size-check, draft, load and orient the image; return it as an 8-bit ``L`` image."""
    width, height = image.size
    _check_size(path, width, height, 1)
    try:
        image.draft("L", (size, size))
        _check_size(path, *image.size, _pil_bytes_per_pixel(image.mode))
        image.load()
    except ImageDecodeError:
        raise
    # PIL's format plugins report corrupt data with many unrelated exception types.
    except Exception as exc:
        raise _decode_error(path, _pil_limit_problem(exc) or "truncated or corrupt image data") from exc
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:
        raise _decode_error(path, "corrupt EXIF orientation metadata") from exc
    return _to_grayscale(image, path)


def _pil_bytes_per_pixel(mode: str) -> int:
    """What PIL stores per pixel: one byte for one 8-bit band, two for 16-bit, else four."""
    if mode.startswith("I;16"):
        return 2
    return 1 if len(mode) == 1 and mode not in ("I", "F") else 4


def _to_grayscale(image: Image.Image, path: Path) -> Image.Image:
    if image.mode == "L":
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        try:
            return Image.fromarray(_stretch_by_rows(_ImageRows(image)))
        except _NonFinitePixels as exc:
            raise _decode_error(path, f"image has {exc} (PIL mode {image.mode})") from exc
    if image.mode in _ALPHA_DROPPING_MODES:
        image = image.convert(_ALPHA_DROPPING_MODES[image.mode])
    try:
        return image.convert("L")
    except ValueError as exc:
        raise _decode_error(path, f"unsupported colour mode {image.mode}") from exc


class _ImageRows:
    """A PIL image read as NumPy rows one block at a time, so no full-size copy of it is made
    (``np.asarray`` of a whole 16/32-bit image would take twice its size while it is built)."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        self.shape = (image.height, image.width)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.image.crop((0, rows.start, self.image.width, min(rows.stop, self.image.height))))


def _row_blocks(pixels: np.ndarray | _ImageRows) -> Iterator[slice]:
    step = max(1, _BLOCK_PIXELS // max(1, pixels.shape[1]))
    for start in range(0, pixels.shape[0], step):
        yield slice(start, start + step)


def _map_rows(pixels: np.ndarray | _ImageRows, render: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``render`` (elementwise, to ``uint8`` rows) applied one block of rows at a time."""
    gray = np.empty(pixels.shape[:2], dtype=np.uint8)
    with np.errstate(all="ignore"):  # overflow and NaN show up as non-finite values, which are refused
        for rows in _row_blocks(pixels):
            gray[rows] = render(pixels[rows])
    return gray


def _stretch_by_rows(
    pixels: np.ndarray | _ImageRows,
    to_values: Callable[[np.ndarray], np.ndarray] = np.asarray,
    to_gray: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """``to_values(pixels)`` mapped from its own min..max onto 0..1, then ``to_gray``, block by block.

    ``to_gray`` turns a block of 0..1 values into ``uint8`` grey rows (by default it rounds
    them to 0..255). A constant image becomes black (0); NaN or infinite values raise
    :class:`_NonFinitePixels` instead.
    """
    to_gray = to_gray or _unit_to_uint8
    low, high = _value_range(pixels, to_values)
    if high <= low:
        return _map_rows(pixels, lambda rows: to_gray(np.zeros(to_values(rows).shape)))
    return _map_rows(pixels, lambda rows: to_gray((to_values(rows).astype(np.float64) - low) / (high - low)))


def _value_range(pixels: np.ndarray | _ImageRows, to_values: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
    with np.errstate(all="ignore"):  # overflow and NaN show up as non-finite values, which are refused
        ends = np.array(
            [(np.min(values), np.max(values)) for values in (to_values(pixels[rows]) for rows in _row_blocks(pixels))],
            dtype=np.float64,
        )
    low, high = float(ends[:, 0].min()), float(ends[:, 1].max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise _NonFinitePixels("NaN or infinite pixel values")
    return low, high


def _unit_to_uint8(unit: np.ndarray) -> np.ndarray:
    if not np.isfinite(unit).all():
        raise _NonFinitePixels("NaN or infinite pixel values")
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _resize(image: Image.Image, size: int) -> np.ndarray:
    resized = image.resize(
        (size, size), Image.Resampling.BILINEAR, reducing_gap=_RESIZE_REDUCING_GAP
    )
    return np.array(resized, dtype=np.uint8)


def _decode_dicom(stream: BinaryIO, path: Path, has_magic: bool) -> Image.Image:
    """Read a DICOM file's first frame and render it the way a viewer would show it, as an ``L`` image.

    The header is read and checked first; then only the first frame is decoded, straight from
    the file where the transfer syntax allows. Files without the ``DICM`` magic are read with
    ``force``, which parses almost anything, so for them a missing image means the file was
    no DICOM at all.
    """
    meta = _read_dicom_meta(path) if has_magic else None
    from_file = meta is not None and meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian
    if meta is not None and not from_file:  # pydicom inflates a Deflated file whole, so read it once, whole
        _check_inflated_size(stream, path, meta)
    dataset = _read_dicom(stream, path, has_magic, stop_before_pixels=from_file)
    if not (stream.read(1) if from_file else "PixelData" in dataset):
        if has_magic:
            raise _decode_error(path, "DICOM file has no image (no pixel data)")
        raise _decode_error(path, "not an image (neither a known image format nor DICOM)")
    _check_dicom_header(dataset, path)
    stream.seek(0)
    pixels = _dicom_first_frame(stream if from_file else dataset, dataset, path)
    try:
        return Image.fromarray(_render_dicom(pixels, dataset))
    # Malformed LUT or window attributes surface as ValueError, AttributeError, KeyError, ... .
    except Exception as exc:
        raise _decode_error(path, f"cannot display DICOM pixel data ({first_line(exc)})") from exc


def _read_dicom_meta(path: Path) -> FileMetaDataset:
    try:
        return read_file_meta_info(path)
    # pydicom reports malformed element data with many unrelated exception types.
    except Exception as exc:
        raise _decode_error(path, "not a valid DICOM file (corrupt header)") from exc


def _check_inflated_size(stream: BinaryIO, path: Path, meta: FileMetaDataset) -> None:
    """Refuse a Deflated dataset that pydicom would inflate to too much memory (it holds the
    inflated dataset and a copy of its pixel data); measured here chunk by chunk, keeping nothing."""
    group_length = meta.get("FileMetaInformationGroupLength")
    if not isinstance(group_length, int):
        raise _decode_error(path, "Deflated DICOM file without FileMetaInformationGroupLength")
    stream.seek(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC) + 12 + group_length)
    inflater, inflated, limit = zlib.decompressobj(-zlib.MAX_WBITS), 0, MAX_DECODE_BYTES // 2
    try:
        while not inflater.eof and inflated <= limit and (data := inflater.unconsumed_tail or stream.read(_BLOCK_PIXELS)):
            inflated += len(inflater.decompress(data, _BLOCK_PIXELS))
    except zlib.error:
        pass  # corrupt data: pydicom's own read below reports it
    stream.seek(0)
    if inflated > limit:
        raise _decode_error(path, (
            f"DICOM file too large to decode (its Deflated data inflates to more than {limit:,} bytes; "
            f"the limit is MAX_DECODE_BYTES / 2 = {limit:,} bytes)"
        ))


def _read_dicom(stream: BinaryIO, path: Path, has_magic: bool, stop_before_pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(stream, force=not has_magic, stop_before_pixels=stop_before_pixels)
    # pydicom reports malformed element data with many unrelated exception types.
    except Exception as exc:
        raise _decode_error(path, "not a valid DICOM file (corrupt header)") from exc


def _check_dicom_header(dataset: Dataset, path: Path) -> None:
    """Refuse what pydicom could not decode, or not within the memory bound, naming the element."""
    try:
        rows, columns = _dicom_count(dataset, "Rows", path), _dicom_count(dataset, "Columns", path)
        _dicom_count(dataset, "NumberOfFrames", path, default=1)
        bits = _dicom_count(dataset, "BitsAllocated", path)
        samples = _dicom_count(dataset, "SamplesPerPixel", path)
        photometric = _dicom_photometric(dataset, path)
    except ImageDecodeError:
        raise
    # Reading an element converts its raw bytes, which fails in many ways on a corrupt header.
    except Exception as exc:
        raise _decode_error(path, "not a valid DICOM file (corrupt header)") from exc
    if bits not in _DICOM_BITS_ALLOCATED:
        raise _decode_error(path, f"unsupported DICOM BitsAllocated {bits} (supported: 1, 8, 16 or 32)")
    if samples != _DICOM_PHOTOMETRIC_SAMPLES[photometric]:
        raise _decode_error(path, (
            f"DICOM SamplesPerPixel is {samples}, but photometric interpretation {photometric!r} "
            f"has {_DICOM_PHOTOMETRIC_SAMPLES[photometric]}"
        ))
    _check_size(path, columns, rows, samples * max(1, bits // 8))


def _dicom_count(dataset: Dataset, keyword: str, path: Path, default: int | None = None) -> int:
    """A header element that must be a positive whole number; ``default`` stands in when absent or empty."""
    value = dataset[keyword].value if keyword in dataset else None
    if value is None or value == "":
        if default is not None:
            return default
        raise _decode_error(path, f"DICOM {keyword} is {'empty' if keyword in dataset else 'missing'}")
    if isinstance(value, int) and value >= 1:
        return int(value)
    raise _decode_error(path, f"DICOM {keyword} is {str(value)!r}, not a positive whole number")


def _dicom_photometric(dataset: Dataset, path: Path) -> str:
    value = dataset.get("PhotometricInterpretation")
    if not value:
        raise _decode_error(path, f"DICOM PhotometricInterpretation is {'empty' if value == '' else 'missing'}")
    if str(value) not in _DICOM_PHOTOMETRIC_SAMPLES:
        raise _decode_error(path, f"unsupported photometric interpretation {str(value)!r}")
    return str(value)


def _dicom_first_frame(source: BinaryIO | Dataset, dataset: Dataset, path: Path) -> np.ndarray:
    """Decode frame 0 only: from the open file when possible, so no other frame is even read."""
    try:
        return pixel_array(source, index=0)
    # pydicom's pixel decoders raise RuntimeError, NotImplementedError, ValueError, ... .
    except Exception as exc:
        raise _decode_error(path, _dicom_pixel_problem(dataset)) from exc


def _dicom_pixel_problem(dataset: Dataset) -> str:
    """Why pydicom could not decode the pixels: an unknown or a compressed transfer syntax, else damage."""
    transfer_syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if transfer_syntax is None:
        return "truncated or corrupt DICOM pixel data"
    if not transfer_syntax.is_transfer_syntax:  # a damaged or private UID: is_compressed would raise
        return f"unknown DICOM transfer syntax {str(transfer_syntax)!r}"
    if transfer_syntax.is_compressed:
        return (
            f"cannot decode DICOM pixel data compressed as '{transfer_syntax.name}' "
            "(install a pydicom decoder plugin such as pylibjpeg or python-gdcm)"
        )
    return "truncated or corrupt DICOM pixel data"


def _render_dicom(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Monochrome data goes through the display pipeline; colour data becomes luminance.

    pydicom already converts YBR colour data to RGB; palette colour is expanded here. All of it
    is elementwise, so it runs one block of rows at a time (see :func:`_map_rows`).
    """
    photometric = str(dataset.PhotometricInterpretation)
    if photometric in _MONOCHROME:
        invert = photometric == "MONOCHROME1"
        return _dicom_monochrome(pixels, dataset, (lambda unit: _unit_to_uint8(1.0 - unit)) if invert else _unit_to_uint8)
    to_rgb = (lambda rows: apply_color_lut(rows, dataset)) if photometric == "PALETTE COLOR" else np.asarray
    if to_rgb(pixels[:1]).dtype == np.uint8:
        return _map_rows(pixels, lambda rows: _rgb_to_gray(to_rgb(rows)))
    return _stretch_by_rows(pixels, to_rgb, _rgb_unit_to_gray)


def _rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _rgb_unit_to_gray(unit: np.ndarray) -> np.ndarray:
    return _rgb_to_gray(_unit_to_uint8(unit))


def _dicom_monochrome(pixels: np.ndarray, dataset: Dataset, to_gray: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply modality LUT/rescale, then the VOI window or LUT, and scale to 0..1, then ``to_gray``.

    A window maps onto the full output range even when the image does not reach both ends
    of it, so window edges (not the image's own min/max) define black and white; a VOI LUT
    sequence or no VOI information at all falls back to the image's own min..max.
    """

    def modality(rows: np.ndarray) -> np.ndarray:
        return apply_modality_lut(rows, dataset).astype(np.float64)

    if "VOILUTSequence" in dataset:
        return _stretch_by_rows(pixels, lambda rows: apply_voi_lut(modality(rows), dataset), to_gray)
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        # Windowing the extremes yields the window's black and white output levels.
        black, white = apply_windowing(np.array([-np.inf, np.inf]), dataset)
        return _map_rows(pixels, lambda rows: to_gray((apply_windowing(modality(rows), dataset) - black) / (white - black)))
    return _stretch_by_rows(pixels, modality, to_gray)
