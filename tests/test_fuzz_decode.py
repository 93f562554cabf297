"""Property: whatever bytes a file holds, decoding ends in a uint8 image of the right shape or in one
ImageDecodeError line naming the file, never in another exception; ``cxr-predict`` on a folder of
such files never prints a traceback.

Inputs start as small valid PNG, JPEG and DICOM files and get bytes flipped, inserted, deleted
and truncated. The runs are derandomized (a fixed sequence of examples) so CI is reproducible.
"""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxr.data.images import decode_grayscale
from cxr.errors import ImageDecodeError
from cxr.predict import main as predict_main

from test_bad_inputs import checkpoint_path, dicom_bytes, png_bytes  # noqa: F401 (fixture)

SIZE = 16


def _jpeg_bytes() -> bytes:
    stream = BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3).save(stream, format="JPEG", quality=90)
    return stream.getvalue()


SEEDS = {".png": png_bytes(), ".jpg": _jpeg_bytes(), ".dcm": dicom_bytes()}

_edit = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


@st.composite
def mutated_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(suffix, bytes): a seed file with one to four edits at positions anywhere in it."""
    suffix = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[suffix])
    for kind, where, what in draw(st.lists(_edit, min_size=1, max_size=4)):
        at = where % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= what
        elif kind == "insert":
            data[at:at] = what
        elif kind == "delete":
            del data[at : at + what]
        elif kind == "truncate":
            del data[at:]
    return suffix, bytes(data)


def _decodes_or_one_line(path: Path) -> None:
    try:
        decoded = decode_grayscale(path, SIZE)
    except ImageDecodeError as err:
        message = str(err)
        assert message.startswith(f"{path}: ") and len(message) > len(f"{path}: ")
        assert "\n" not in message
        return
    assert decoded.shape == (SIZE, SIZE)
    assert decoded.dtype == np.uint8


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated_files())
def test_any_mutated_file_decodes_or_is_one_decode_error(tmp_path, mutated):
    suffix, data = mutated
    path = tmp_path / f"mutated{suffix}"
    path.write_bytes(data)

    _decodes_or_one_line(path)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(mutated_files(), min_size=1, max_size=3))
def test_predict_on_a_folder_of_mutated_files_never_prints_a_traceback(
    checkpoint_path, tmp_path_factory, capsys, files  # noqa: F811 (the imported fixture)
):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "valid.png").write_bytes(png_bytes())
    for index, (suffix, data) in enumerate(files):
        (folder / f"mutated_{index}{suffix}").write_bytes(data)

    predict_main([str(checkpoint_path), str(folder), "--json"])

    out, err = capsys.readouterr()
    predicted = {row["path"] for row in json.loads(out)}
    skipped = err.splitlines()
    assert str(folder / "valid.png") in predicted
    assert all(line.startswith(f"skipped {folder}/mutated_") for line in skipped), skipped
    reported = predicted | {line.removeprefix("skipped ").split(": ", 1)[0] for line in skipped}
    assert reported == {str(path) for path in folder.iterdir()}


@pytest.mark.parametrize("suffix", sorted(SEEDS))
def test_the_seed_files_are_valid(tmp_path, suffix):
    path = tmp_path / f"seed{suffix}"
    path.write_bytes(SEEDS[suffix])

    assert decode_grayscale(path, SIZE).shape == (SIZE, SIZE)
