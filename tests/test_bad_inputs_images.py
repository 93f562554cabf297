"""Bad image files (issue 28, cases 6-8): each one is one ImageDecodeError line naming the file and the
real reason, is skipped (never fatal) by preprocess and cxr-predict, and takes bounded memory.

Every file is made here, tiny. The reasons are checked exactly: by ``decode_grayscale``, in
preprocess's skipped table, and on ``cxr-predict``'s stderr for a folder that also holds valid images.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr.data import images
from cxr.data.images import decode_grayscale
from cxr.data.preprocess import preprocess_split
from cxr.data.split import index_split
from cxr.errors import ImageDecodeError
from cxr.predict import main as predict_main
from cxr.training.models import build_model

from conftest import CLASSES, make_kaggle_tree

SIZE = 32
TEXT_LIMIT = "a metadata chunk over PIL's limit (PngImagePlugin.MAX_TEXT_CHUNK = 1,048,576 bytes decompressed)"
NON_FINITE = "image has NaN or infinite pixel values (PIL mode F)"


# --- tiny files -------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(extra: bytes = b"", header: bytes | None = None) -> bytes:
    """A valid 4x4 8-bit grey PNG; ``extra`` chunks go between IHDR and IDAT; ``header`` replaces IHDR's data."""
    header = struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0) if header is None else header
    rows = b"".join(b"\x00" + bytes([60, 60, 200, 200]) for _ in range(4))
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra
        + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    )


def _big_compressed_text() -> bytes:
    return zlib.compress(b"a" * (2 * 1024 * 1024))  # 2 MB of text in a few KB


def dicom_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                  syntax: str = ExplicitVRLittleEndian) -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.set_pixel_data(pixels, photometric, bits_stored)
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    return dataset


def dicom_bytes(edit: Callable[[Dataset], object] = lambda dataset: None, **kwargs) -> bytes:
    """A valid 4x4 DICOM file (``dicom_dataset(**kwargs)``), after ``edit`` changed its header."""
    pixels = kwargs.pop("pixels", np.arange(16, dtype=np.uint16).reshape(4, 4) * 200)
    dataset = dicom_dataset(pixels, **kwargs)
    edit(dataset)
    stream = BytesIO()
    dataset.save_as(stream, enforce_file_format=True)
    return stream.getvalue()


def _set(**elements) -> Callable[[Dataset], None]:
    def edit(dataset: Dataset) -> None:
        for keyword, value in elements.items():
            if value is None:
                del dataset[keyword]
            else:
                setattr(dataset, keyword, value)

    return edit


def _empty(keyword: str) -> Callable[[Dataset], None]:
    def edit(dataset: Dataset) -> None:
        dataset[keyword].value = None

    return edit


def _number_of_frames_abc() -> bytes:
    """NumberOfFrames 'abc': pydicom refuses to write it, so the valid '1' is patched in the bytes."""
    data = dicom_bytes(_set(NumberOfFrames="1"))
    valid, invalid = b"\x28\x00\x08\x00IS\x02\x001 ", b"\x28\x00\x08\x00IS\x04\x00abc "
    assert data.count(valid) == 1
    return data.replace(valid, invalid)


def _float_tiff(bad_value: float) -> bytes:
    pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    pixels[3, 3] = bad_value
    stream = BytesIO()
    Image.fromarray(pixels).save(stream, format="TIFF")
    return stream.getvalue()


# name -> (file bytes, exact reason after "<path>: ")
CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "ztxt_over_limit.png": (lambda: png_bytes(png_chunk(b"zTXt", b"k\x00\x00" + _big_compressed_text())), TEXT_LIMIT),
    "itxt_over_limit.png": (
        lambda: png_bytes(png_chunk(b"iTXt", b"k\x00\x01\x00\x00\x00" + _big_compressed_text())), TEXT_LIMIT
    ),
    "iccp_over_limit.png": (lambda: png_bytes(png_chunk(b"iCCP", b"k\x00\x00" + _big_compressed_text())), TEXT_LIMIT),
    "short_ihdr.png": (lambda: png_bytes(header=b"\x00\x00\x00\x04\x00"), "corrupt PNG header (Truncated IHDR chunk)"),
    "columns_empty.dcm": (lambda: dicom_bytes(_empty("Columns")), "DICOM Columns is empty"),
    "rows_missing.dcm": (lambda: dicom_bytes(_set(Rows=None)), "DICOM Rows is missing"),
    "photometric_xyz.dcm": (
        lambda: dicom_bytes(_set(PhotometricInterpretation="XYZ")), "unsupported photometric interpretation 'XYZ'"
    ),
    "photometric_missing.dcm": (
        lambda: dicom_bytes(_set(PhotometricInterpretation=None)), "DICOM PhotometricInterpretation is missing"
    ),
    "frames_abc.dcm": (_number_of_frames_abc, "DICOM NumberOfFrames is 'abc', not a positive whole number"),
    "frames_zero.dcm": (
        lambda: dicom_bytes(_set(NumberOfFrames=0)), "DICOM NumberOfFrames is '0', not a positive whole number"
    ),
    "bits_allocated_12.dcm": (
        lambda: dicom_bytes(_set(BitsAllocated=12)), "unsupported DICOM BitsAllocated 12 (supported: 1, 8, 16 or 32)"
    ),
    "samples_3_mono.dcm": (
        lambda: dicom_bytes(_set(SamplesPerPixel=3)),
        "DICOM SamplesPerPixel is 3, but photometric interpretation 'MONOCHROME2' has 1",
    ),
    "nan.tif": (lambda: _float_tiff(np.nan), NON_FINITE),
    "inf.tif": (lambda: _float_tiff(np.inf), NON_FINITE),
}


def write_cases(folder: Path) -> dict[Path, str]:
    """Every bad case as a file in ``folder``; returns {path: exact one-line message}."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (make, reason) in CASES.items():
        path = folder / name
        path.write_bytes(make())
        expected[path] = f"{path}: {reason}"
    return expected


# --- decode_grayscale: the exact one-line reason ------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_file_is_one_line_naming_the_file_and_the_reason(tmp_path, name):
    make, reason = CASES[name]
    path = tmp_path / name
    path.write_bytes(make())

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)

    assert str(excinfo.value) == f"{path}: {reason}"


def test_the_same_files_made_valid_decode(tmp_path):
    """The fixtures differ from valid files only in the broken part."""
    good = {"good.png": png_bytes(), "good.dcm": dicom_bytes()}
    for name, data in good.items():
        (tmp_path / name).write_bytes(data)
        assert decode_grayscale(tmp_path / name, SIZE).shape == (SIZE, SIZE)


def test_png_over_the_decode_byte_limit_names_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "sixteen_bit.png"
    Image.fromarray(np.arange(10_000, dtype=np.uint16).reshape(100, 100)).save(path)
    monkeypatch.setattr(images, "MAX_DECODE_BYTES", 40_000)

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)

    assert str(excinfo.value) == (
        f"{path}: image too large to decode (100x100 at 2 bytes per pixel needs 50,000 bytes; "
        "the limit is MAX_DECODE_BYTES = 40,000 bytes)"
    )


def test_deflated_dicom_inflating_past_the_limit_is_refused_before_pydicom_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "deflated.dcm"
    frames = np.zeros((20, 250, 250), dtype=np.uint8)  # 1.25 MB inflated, a few KB on disk
    dicom_dataset(frames, bits_stored=8, syntax=DeflatedExplicitVRLittleEndian).save_as(path, enforce_file_format=True)
    monkeypatch.setattr(images, "MAX_DECODE_BYTES", 2 * 1024 * 1024)
    monkeypatch.setattr(images.pydicom, "dcmread", lambda *args, **kwargs: pytest.fail("pydicom read the file"))

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)

    assert str(excinfo.value) == (
        f"{path}: DICOM file too large to decode (its Deflated data inflates to more than 1,048,576 bytes; "
        "the limit is MAX_DECODE_BYTES / 2 = 1,048,576 bytes)"
    )


# --- memory: one frame, and a bound in bytes -----------------------------------------------------


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_multi_frame_dicom_decodes_only_its_first_frame(tmp_path, monkeypatch, syntax):
    first = np.tile(np.array([0, 255], dtype=np.uint8).repeat(SIZE // 2), (SIZE, 1))
    frames = np.stack([first, *[255 - first] * 30])
    path = tmp_path / "frames.dcm"
    dicom_dataset(frames, bits_stored=8, syntax=syntax).save_as(path, enforce_file_format=True)
    asked = []

    def recording_pixel_array(source, **kwargs):
        asked.append(kwargs)
        return real_pixel_array(source, **kwargs)

    real_pixel_array = images.pixel_array
    monkeypatch.setattr(images, "pixel_array", recording_pixel_array)

    decoded = decode_grayscale(path, SIZE)

    assert asked == [{"index": 0}]
    np.testing.assert_array_equal(decoded, first)


_RSS_SCRIPT = """
import resource, sys
from pathlib import Path
import numpy as np
from PIL import Image
from cxr.data.images import decode_grayscale
warm_up = Path(sys.argv[2])
Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8)).save(warm_up)
decode_grayscale(warm_up, 224)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decode_grayscale(Path(sys.argv[1]), 224)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_sixteen_bit_png_peak_memory_is_within_the_documented_bound(tmp_path):
    """The module docstring's bound: pixels x (2 x 2 bytes + 1) + 16 MB of row-block working memory."""
    path = tmp_path / "sixteen_bit_3000.png"
    Image.fromarray(np.tile(np.arange(3000, dtype=np.uint16), (3000, 1))).save(path)
    bound = 3000 * 3000 * (2 * 2 + 1) + 16 * 1024 * 1024

    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path), str(tmp_path / "warm_up.png")],
        capture_output=True, text=True, check=True,
    )

    growth = int(result.stdout)
    assert growth <= bound, f"peak RSS grew by {growth:,} bytes decoding a 16-bit 3000x3000 PNG; the bound is {bound:,}"


# --- preprocess: skipped and listed, the run goes on -------------------------------------------


def test_preprocess_skips_each_bad_file_with_its_reason_and_keeps_the_rest(tmp_path):
    data = make_kaggle_tree(tmp_path / "raw", per_class=2, size=40, splits=("train",))
    expected = write_cases(data / "train" / "NORMAL")
    frame = index_split(data, "train", CLASSES)

    kept, skipped = preprocess_split(data, frame, SIZE, 1, "train", CLASSES, tmp_path / "processed")

    assert len(kept) == 2 * len(CLASSES)
    assert dict(zip(skipped["path"], skipped["reason"])) == {
        str(path.relative_to(data)): message for path, message in expected.items()
    }
    assert np.load(tmp_path / "processed" / "train.npy").shape == (len(kept), SIZE, SIZE)


# --- cxr-predict on a folder: valid images predicted, one stderr line per bad file -----------------


@pytest.fixture
def checkpoint_path(tmp_path: Path) -> Path:
    """A tiny untrained custom CNN saved the way training saves one (as tests/test_predict.py does)."""
    torch.manual_seed(0)
    model_args = {"arch": "custom_cnn", "num_classes": 3, "mean": [0.5], "std": [0.25], "width": 8}
    path = tmp_path / "model.pt"
    torch.save(
        {"model": build_model(**model_args).state_dict(), "model_args": model_args, "classes": list(CLASSES),
         "image_size": SIZE, "approach": "custom"},
        path,
    )
    return path


def test_predict_on_a_folder_predicts_the_valid_images_and_reports_each_bad_one_on_one_line(
    checkpoint_path, tmp_path, capsys
):
    folder = tmp_path / "xrays"
    expected = write_cases(folder)
    valid = [folder / "valid.png", folder / "valid.dcm"]
    valid[0].write_bytes(png_bytes())
    valid[1].write_bytes(dicom_bytes())

    predict_main([str(checkpoint_path), str(folder), "--json"])

    out, err = capsys.readouterr()
    assert sorted(row["path"] for row in json.loads(out)) == sorted(map(str, valid))
    assert sorted(err.splitlines()) == sorted(f"skipped {message}" for message in expected.values())
