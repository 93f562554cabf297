"""Turn one image file into the pipeline's pixels: a square 8-bit grayscale array.

Every stage that reads pixels (preprocess over thousands of files in worker processes, and
``cxr-predict`` on a user's own files, DICOM included) goes through :func:`decode_grayscale`,
so training and prediction see identically decoded images. Any problem with a file surfaces
as one :class:`~cxr.errors.ImageDecodeError` line naming the file, never as a traceback from
inside PIL or pydicom.

Choices worth knowing:

* Alpha is dropped (the colour channels are used as stored, not composited onto a
  background): X-rays with transparency are rare and the stored grey values are the signal.
* High-bit-depth images (16-bit PNG/TIFF, float TIFF) are stretched from their own minimum
  to their own maximum, because 12-bit data stored in 16-bit containers would otherwise come
  out nearly black.
* The whole image is resized to ``size x size`` (aspect ratio not preserved) with bilinear
  resampling; JPEGs are decoded at a reduced DCT scale first when they are much larger than
  the target, which makes big JPEGs several times faster to read.
* ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default ``False`` so a truncated file
  raises instead of being silently padded with grey.
"""

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing

from cxr.errors import ImageDecodeError

MAX_PIXELS = 100_000_000
"""Largest width x height accepted: bigger files are almost surely not chest X-rays and
could exhaust a worker's memory while decoding."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"})
"""Lower-case suffixes that ``cxr-predict`` picks up when it scans a folder."""

JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})
"""Lower-case names of files that operating systems drop into folders; never images."""

_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_ALPHA_DROPPING_MODES = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L", "PA": "P"}
_RESIZE_REDUCING_GAP = 3.0


def is_candidate_image(path: Path) -> bool:
    """Whether a file found in a class folder should be decoded at all.

    Hidden files and OS junk are skipped silently; every other regular file is a candidate,
    whatever its suffix, so a corrupt or misnamed image fails decoding with a reason instead
    of silently vanishing from the data set.
    """
    name = path.name
    if name.startswith(".") or name.lower() in JUNK_NAMES:
        return False
    return path.is_file()


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
    image = _open_with_pil(stream, path)
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


def _too_large_problem(width: int, height: int) -> str:
    return (
        f"image too large ({width}x{height} = {width * height:,} pixels; "
        f"the limit is MAX_PIXELS = {MAX_PIXELS:,} pixels)"
    )


def _not_an_image_problem(header: bytes) -> str:
    if header.startswith(b"version https://git-lfs"):
        return "not an image (a Git LFS pointer file; fetch the real file with `git lfs pull`)"
    if _is_probably_text(header):
        return "not an image (the file contains text)"
    return "not an image (unrecognised file format)"


def _is_probably_text(header: bytes) -> bool:
    """Binary formats have control bytes near the start; text (HTML, CSV, ...) does not."""
    return all(byte >= 0x20 or byte in b"\t\n\r\f" for byte in header)


def _open_with_pil(stream: BinaryIO, path: Path) -> Image.Image | None:
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


def _load_with_pil(image: Image.Image, path: Path, size: int) -> Image.Image:
    """Size-check, draft, load and orient the image; return it as an 8-bit ``L`` image."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise _decode_error(path, _too_large_problem(width, height))
    try:
        image.draft("L", (size, size))
        image.load()
    # PIL's format plugins report corrupt data with many unrelated exception types.
    except Exception as exc:
        raise _decode_error(path, "truncated or corrupt image data") from exc
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:
        raise _decode_error(path, "corrupt EXIF orientation metadata") from exc
    return _to_grayscale(image, path)


def _to_grayscale(image: Image.Image, path: Path) -> Image.Image:
    if image.mode == "L":
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(_unit_to_uint8(_stretch_to_unit(values)))
    if image.mode in _ALPHA_DROPPING_MODES:
        image = image.convert(_ALPHA_DROPPING_MODES[image.mode])
    try:
        return image.convert("L")
    except ValueError as exc:
        raise _decode_error(path, f"unsupported colour mode {image.mode}") from exc


def _stretch_to_unit(values: np.ndarray) -> np.ndarray:
    """Map the array's own min..max linearly onto 0..1 (a constant image becomes black)."""
    low, high = float(np.min(values)), float(np.max(values))
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - low) / (high - low)


def _unit_to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _resize(image: Image.Image, size: int) -> np.ndarray:
    resized = image.resize(
        (size, size), Image.Resampling.BILINEAR, reducing_gap=_RESIZE_REDUCING_GAP
    )
    return np.array(resized, dtype=np.uint8)


def _decode_dicom(stream: BinaryIO, path: Path, has_magic: bool) -> Image.Image:
    """Read a DICOM file and render it the way a viewer would show it, as an 8-bit ``L`` image.

    Files without the ``DICM`` magic are read with ``force``, which parses almost anything, so
    for them a missing image means the file was no DICOM at all.
    """
    try:
        dataset = pydicom.dcmread(stream, force=not has_magic)
    # pydicom reports malformed element data with many unrelated exception types.
    except Exception as exc:
        raise _decode_error(path, "not a valid DICOM file (corrupt header)") from exc
    if "PixelData" not in dataset:
        if has_magic:
            raise _decode_error(path, "DICOM file has no image (no pixel data)")
        raise _decode_error(path, "not an image (neither a known image format nor DICOM)")
    width, height = int(dataset.get("Columns", 0)), int(dataset.get("Rows", 0))
    if width * height > MAX_PIXELS:
        raise _decode_error(path, _too_large_problem(width, height))
    pixels = _dicom_first_frame(dataset, path)
    try:
        return _render_dicom(pixels, dataset)
    # Malformed LUT or window attributes surface as ValueError, AttributeError, KeyError, ... .
    except Exception as exc:
        raise _decode_error(path, f"cannot display DICOM pixel data ({exc})") from exc


def _dicom_first_frame(dataset: Dataset, path: Path) -> np.ndarray:
    try:
        pixels = dataset.pixel_array
    # pydicom's pixel decoders raise RuntimeError, NotImplementedError, ValueError, ... .
    except Exception as exc:
        raise _decode_error(path, _dicom_pixel_problem(dataset)) from exc
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        return pixels[0]
    return pixels


def _dicom_pixel_problem(dataset: Dataset) -> str:
    transfer_syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if transfer_syntax is not None and transfer_syntax.is_compressed:
        return (
            f"cannot decode DICOM pixel data compressed as '{transfer_syntax.name}' "
            "(install a pydicom decoder plugin such as pylibjpeg or python-gdcm)"
        )
    return "truncated or corrupt DICOM pixel data"


def _render_dicom(pixels: np.ndarray, dataset: Dataset) -> Image.Image:
    """Monochrome data goes through the display pipeline; colour data becomes luminance.

    pydicom already converts YBR colour data to RGB; palette colour is expanded here.
    """
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, dataset)
    if pixels.ndim == 2:
        unit = _dicom_monochrome_to_unit(pixels, dataset)
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
        return Image.fromarray(_unit_to_uint8(unit))
    if pixels.dtype != np.uint8:
        pixels = _unit_to_uint8(_stretch_to_unit(pixels.astype(np.float64)))
    return Image.fromarray(pixels).convert("L")


def _dicom_monochrome_to_unit(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Apply modality LUT/rescale, then the VOI window or LUT, and scale to 0..1.

    A window maps onto the full output range even when the image does not reach both ends
    of it, so window edges (not the image's own min/max) define black and white; a VOI LUT
    sequence or no VOI information at all falls back to the image's own min..max.
    """
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    if "VOILUTSequence" in dataset:
        return _stretch_to_unit(apply_voi_lut(values, dataset).astype(np.float64))
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        # Windowing the extremes yields the window's black and white output levels.
        black, white = apply_windowing(np.array([-np.inf, np.inf]), dataset)
        return (apply_windowing(values, dataset) - black) / (white - black)
    return _stretch_to_unit(values)
