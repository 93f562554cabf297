"""Decoding every kind of file users feed the pipeline, or failing with one clear line."""

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr.data import images
from cxr.data.candidates import is_candidate_image
from cxr.data.images import IMAGE_SUFFIXES, MAX_PIXELS, decode_grayscale
from cxr.errors import ImageDecodeError

SIZE = 32


def _left_dark_right_bright(width: int = 40, height: int = 30) -> np.ndarray:
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, width // 2 :] = 255
    return pixels


def _assert_left_dark_right_bright(decoded: np.ndarray) -> None:
    left, right = decoded[:, : SIZE // 4], decoded[:, -SIZE // 4 :]
    assert left.mean() < 30
    assert right.mean() > 225


def _assert_one_line_error_naming(excinfo: pytest.ExceptionInfo, path: Path, *words: str) -> str:
    message = str(excinfo.value)
    assert excinfo.type is ImageDecodeError
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message
    return message


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG declaring a huge size but holding almost no data: a cheap decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )
    return path


def _write_dicom(
    path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **elements
) -> Path:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.set_pixel_data(pixels, photometric, 12)
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path, enforce_file_format=True)
    return path


def _horizontal_ramp(maximum: int, width: int = SIZE, height: int = 48) -> np.ndarray:
    """Columns span 0..maximum; as wide as the output so resizing keeps both extremes exact."""
    row = np.linspace(0, maximum, width).round().astype(np.uint16)
    return np.tile(row, (height, 1))


# --- decoding valid files -------------------------------------------------------------------


def test_returns_writable_uint8_square(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.full((30, 50), 77, dtype=np.uint8)).save(path)

    decoded = decode_grayscale(path, SIZE)

    assert decoded.shape == (SIZE, SIZE)
    assert decoded.dtype == np.uint8
    assert decoded.flags.writeable
    assert np.all(decoded == 77)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("1", ".png"),
        ("L", ".png"),
        ("LA", ".png"),
        ("RGB", ".jpg"),
        ("RGBA", ".png"),
        ("P", ".png"),
        ("I;16", ".png"),
        ("CMYK", ".jpg"),
        ("CMYK", ".tif"),
        ("F", ".tif"),
        ("RGB", ".bmp"),
    ],
)
def test_every_pixel_format_becomes_the_same_grayscale(tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    Image.fromarray(_left_dark_right_bright()).convert(mode).save(path)

    _assert_left_dark_right_bright(decode_grayscale(path, SIZE))


def test_sixteen_bit_png_is_stretched_by_its_own_range_not_clipped(tmp_path):
    path = tmp_path / "twelve_bit.png"
    Image.fromarray(_horizontal_ramp(4095)).save(path)
    with Image.open(path) as written:
        assert written.mode.startswith("I")

    decoded = decode_grayscale(path, SIZE)

    assert decoded.min() == 0
    assert decoded.max() == 255
    assert decoded[:, 0].mean() < decoded[:, SIZE // 2].mean() < decoded[:, -1].mean()


def test_rgba_alpha_is_dropped_not_composited(tmp_path):
    path = tmp_path / "transparent.png"
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    Image.fromarray(rgba).save(path)

    assert np.all(decode_grayscale(path, SIZE) == 200)


def test_palette_with_transparency_uses_palette_grey(tmp_path):
    path = tmp_path / "palette.png"
    indices = np.array([[0, 1], [1, 0]], dtype=np.uint8).repeat(10, axis=0).repeat(10, axis=1)
    palette_image = Image.frombytes("P", (20, 20), indices.tobytes())
    palette_image.putpalette([10, 10, 10, 240, 240, 240])
    palette_image.save(path, transparency=0)

    decoded = decode_grayscale(path, SIZE)

    assert set(np.unique(decoded[:4, :4])) == {10}
    assert set(np.unique(decoded[:4, -4:])) == {240}


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    stored = Image.fromarray(255 - _left_dark_right_bright(80, 40))  # bright left half, landscape
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(path, exif=exif, quality=95)

    decoded = decode_grayscale(path, SIZE)

    top, bottom = decoded[: SIZE // 4], decoded[-SIZE // 4 :]
    assert top.mean() > 225
    assert bottom.mean() < 30


def test_png_that_is_really_a_jpeg(tmp_path):
    path = tmp_path / "misnamed.png"
    Image.fromarray(_left_dark_right_bright()).save(path, format="JPEG")

    _assert_left_dark_right_bright(decode_grayscale(path, SIZE))


def test_tiny_image_upscales(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(_left_dark_right_bright(10, 10)).save(path)

    decoded = decode_grayscale(path, 64)

    assert decoded.shape == (64, 64)
    _assert_left_dark_right_bright(decoded[:, ::2][:SIZE, :SIZE])


def test_large_jpeg_is_decoded_at_reduced_scale_with_the_same_result(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(_left_dark_right_bright(2000, 1600)).save(path, quality=95)

    _assert_left_dark_right_bright(decode_grayscale(path, SIZE))


# --- DICOM ----------------------------------------------------------------------------------


def test_dicom_without_window_is_min_max_scaled_and_detected_by_magic(tmp_path):
    path = _write_dicom(tmp_path / "no_suffix", _horizontal_ramp(4095))

    decoded = decode_grayscale(path, SIZE)

    assert decoded.min() == 0
    assert decoded.max() == 255
    assert decoded[:, 0].mean() < decoded[:, -1].mean()


def test_dicom_monochrome1_is_inverted(tmp_path):
    ramp = _horizontal_ramp(4095)
    path = _write_dicom(tmp_path / "inverted.dcm", ramp, photometric="MONOCHROME1")

    decoded = decode_grayscale(path, SIZE)

    assert decoded[:, 0].mean() > 250
    assert decoded[:, -1].mean() < 5


def test_dicom_rescale_then_window_define_black_and_white(tmp_path):
    # Stored values 1124 / 1224 / 2024 are 100 / 200 / 1000 after the intercept of -1024;
    # a window of 200 +- 100 makes them black / mid-grey / white (min-max would give 0 / 28 / 255).
    stored = np.array([[1124, 1224, 2024]], dtype=np.uint16).repeat(30, axis=1).repeat(30, axis=0)
    path = _write_dicom(
        tmp_path / "windowed.dcm",
        stored,
        RescaleIntercept=-1024,
        RescaleSlope=1,
        WindowCenter=200,
        WindowWidth=201,
    )

    decoded = decode_grayscale(path, 90)

    assert decoded[:, 5:25].max() <= 2
    assert abs(int(np.median(decoded[:, 35:55])) - 128) <= 3
    assert decoded[:, 65:].min() == 255


def test_dicom_without_pixel_data(tmp_path):
    path = tmp_path / "header_only.dcm"
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.PatientName = "Nobody"
    dataset.save_as(path, enforce_file_format=True)

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)
    _assert_one_line_error_naming(excinfo, path, "no pixel data")


def test_garbage_named_dcm(tmp_path):
    path = tmp_path / "garbage.dcm"
    path.write_bytes(bytes(range(256)) * 4)

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)
    _assert_one_line_error_naming(excinfo, path, "not an image")


def test_dicom_without_preamble_is_read_by_suffix(tmp_path):
    path = tmp_path / "acr_nema.dcm"
    dataset = Dataset()
    dataset.set_pixel_data(_horizontal_ramp(4095), "MONOCHROME2", 12)
    dataset.save_as(path)  # no enforce_file_format: no preamble, no DICM magic
    assert path.read_bytes()[128:132] != b"DICM"

    decoded = decode_grayscale(path, SIZE)

    assert decoded[:, 0].mean() < 5
    assert decoded[:, -1].mean() > 250


def test_png_named_dcm_is_decoded_by_content(tmp_path):
    path = tmp_path / "actually_png.dcm"
    Image.fromarray(_left_dark_right_bright()).save(path, format="PNG")

    _assert_left_dark_right_bright(decode_grayscale(path, SIZE))


def test_dicom_declaring_too_many_pixels_is_rejected_before_decoding(tmp_path):
    tiny_ramp = _horizontal_ramp(4095, 4, 4)
    path = _write_dicom(tmp_path / "huge.dcm", tiny_ramp, Rows=12000, Columns=12000)

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)
    _assert_one_line_error_naming(excinfo, path, "too large", f"{MAX_PIXELS:,}")


# --- errors ---------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)
    _assert_one_line_error_naming(excinfo, path, "empty file")


def test_truncated_jpeg(tmp_path):
    whole, path = tmp_path / "whole.jpg", tmp_path / "truncated.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (300, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(whole, quality=90)
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)
    _assert_one_line_error_naming(excinfo, path, "truncated or corrupt image data")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("<html><body>404 Not Found</body></html>\n")

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)
    _assert_one_line_error_naming(excinfo, path, "not an image", "text")


def test_git_lfs_pointer_is_explained(tmp_path):
    path = tmp_path / "lfs.png"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n")

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)
    _assert_one_line_error_naming(excinfo, path, "not an image", "git lfs pull")


def test_missing_file(tmp_path):
    path = tmp_path / "gone.png"

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)
    _assert_one_line_error_naming(excinfo, path, "file not found")


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    Image.fromarray(_left_dark_right_bright()).save(path)
    if os.geteuid() == 0:  # root reads through chmod 000, so simulate the OS refusing instead

        def refuse(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))

        monkeypatch.setattr(images, "open", refuse, raising=False)
    else:
        path.chmod(0)

    try:
        with pytest.raises(ImageDecodeError) as excinfo:
            decode_grayscale(path, SIZE)
    finally:
        path.chmod(0o644)
    _assert_one_line_error_naming(excinfo, path, "permission denied")


@pytest.mark.parametrize("side", [12_000, 20_000])
def test_image_above_pixel_limit_is_rejected_with_the_limit_in_the_message(tmp_path, side):
    path = _write_png_header_only(tmp_path / f"bomb_{side}.png", side, side)

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_grayscale(path, SIZE)
    _assert_one_line_error_naming(excinfo, path, "too large", f"{MAX_PIXELS:,}")


# --- which files count ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [".DS_Store", "Thumbs.db", "desktop.ini", "._scan.jpg", ".hidden.png"]
)
def test_os_junk_and_hidden_files_are_not_candidates(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"junk")

    assert not is_candidate_image(path)


@pytest.mark.parametrize("name", ["scan.jpg", "corrupt.jpeg", "README", "scan.dcm"])
def test_every_other_regular_file_is_a_candidate(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not really an image")

    assert is_candidate_image(path)


def test_directories_are_not_candidates(tmp_path):
    folder = tmp_path / "sub.jpg"
    folder.mkdir()

    assert not is_candidate_image(folder)


def test_predict_scans_the_usual_image_suffixes():
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"} <= IMAGE_SUFFIXES
