"""``cxr-predict``: a user's PNG/JPEG/DICOM files and folders, bad files skipped, same preprocessing as the pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr.data.images import decode_grayscale
from cxr.evaluation.tta import ViewAveraged
from cxr.predict import find_images, main, predict_files
from cxr.training.models import build_model, load_checkpoint, model_from_checkpoint

CLASSES = ["COVID19", "NORMAL", "PNEUMONIA"]
IMAGE_SIZE = 32


@pytest.fixture
def checkpoint_path(tmp_path: Path) -> Path:
    """A tiny untrained custom CNN saved as a plain-dict checkpoint, the way training saves one."""
    torch.manual_seed(0)
    model_args = {"arch": "custom_cnn", "num_classes": 3, "mean": [0.5], "std": [0.25], "width": 8}
    model = build_model(**model_args)
    with torch.no_grad():  # spread the logits so the predicted class differs between images
        model.head[1].weight.mul_(50.0)
    path = tmp_path / "model.pt"
    checkpoint = {"model": model.state_dict(), "model_args": model_args, "classes": CLASSES}
    torch.save({**checkpoint, "image_size": IMAGE_SIZE, "approach": "custom"}, path)
    return path


def _gradient(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :] * np.ones((height, 1))
    return np.clip(ramp + rng.normal(0, 30, (height, width)), 0, 255).astype(np.uint8)


def _write_dicom(path: Path, pixels: np.ndarray) -> Path:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.set_pixel_data(pixels, "MONOCHROME2", 12)
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Good PNG, JPEG and DICOM files in a folder (with a nested copy of the PNG's name), plus a corrupt JPEG."""
    folder = tmp_path / "xrays"
    (folder / "nested").mkdir(parents=True)
    Image.fromarray(_gradient(40, 48, seed=1)).save(folder / "chest.png")
    Image.fromarray(_gradient(64, 50, seed=2)).save(folder / "nested" / "chest.jpg", quality=90)
    _write_dicom(folder / "scan.dcm", (_gradient(36, 36, seed=3).astype(np.uint16) * 16))
    (folder / "notes.txt").write_text("not an image, and not an image suffix either")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes((folder / "nested" / "chest.jpg").read_bytes()[:200])
    lone = tmp_path / "lone.png"
    Image.fromarray(_gradient(20, 30, seed=4).T.copy()).save(lone)
    return {"folder": folder, "corrupt": corrupt, "lone": lone}


GOOD_IN_FOLDER = ["chest.png", "nested/chest.jpg", "scan.dcm"]


def _expected_probabilities(checkpoint_path: Path, paths: list[Path]) -> np.ndarray:
    """The model run directly on ``decode_grayscale`` output, one image at a time."""
    model = model_from_checkpoint(load_checkpoint(checkpoint_path))
    images = np.stack([decode_grayscale(path, IMAGE_SIZE) for path in paths])
    with torch.inference_mode():
        logits = model(torch.from_numpy(images).float().div(255).unsqueeze(1))
    return torch.softmax(logits, dim=1).numpy()


def _skipped_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("skipped ")]


def test_folder_scan_is_recursive_sorted_and_skips_junk(inputs):
    folder = inputs["folder"]
    assert find_images([folder]) == [folder / name for name in GOOD_IN_FOLDER]
    assert find_images([inputs["lone"], folder, folder / "scan.dcm"])[0] == inputs["lone"]
    assert len(find_images([inputs["lone"], folder, folder / "scan.dcm"])) == 4


def test_table_has_one_row_per_good_image_and_bad_file_is_skipped_once(checkpoint_path, inputs, capsys):
    paths = [inputs["folder"], inputs["corrupt"], inputs["lone"]]
    main([str(checkpoint_path), *map(str, paths), "--batch-size", "2"])
    out, err = capsys.readouterr()
    header, *rows = out.strip().splitlines()
    assert header.split() == ["path", "predicted", *CLASSES]
    good = [inputs["folder"] / name for name in GOOD_IN_FOLDER] + [inputs["lone"]]
    assert [row.split()[0] for row in rows] == [str(path) for path in good]
    assert all(row.split()[1] in CLASSES for row in rows)
    assert len({row.index(row.split()[1]) for row in rows}) == 1, "predicted column is not aligned"
    skipped = _skipped_lines(err)
    assert len(skipped) == 1
    assert skipped[0].startswith(f"skipped {inputs['corrupt']}: ")
    assert len(skipped[0]) > len(f"skipped {inputs['corrupt']}: ")


def test_json_probabilities_match_the_model_on_pipeline_preprocessing(checkpoint_path, inputs, capsys):
    main([str(checkpoint_path), str(inputs["folder"]), str(inputs["lone"]), "--json", "--batch-size", "3"])
    out, err = capsys.readouterr()
    results = json.loads(out)
    good = [inputs["folder"] / name for name in GOOD_IN_FOLDER] + [inputs["lone"]]
    assert [row["path"] for row in results] == [str(path) for path in good]
    probabilities = np.array([[row["probabilities"][name] for name in CLASSES] for row in results])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    expected = _expected_probabilities(checkpoint_path, good)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert [row["predicted"] for row in results] == [CLASSES[i] for i in expected.argmax(axis=1)]
    assert _skipped_lines(err) == []


def test_tta_gives_the_view_averaged_probabilities(checkpoint_path, inputs, capsys):
    main([str(checkpoint_path), str(inputs["folder"]), "--json", "--tta"])
    results = json.loads(capsys.readouterr().out)
    probabilities = np.array([[row["probabilities"][name] for name in CLASSES] for row in results])
    good = [inputs["folder"] / name for name in GOOD_IN_FOLDER]
    model = model_from_checkpoint(load_checkpoint(checkpoint_path))
    images = np.stack([decode_grayscale(path, IMAGE_SIZE) for path in good])
    with torch.inference_mode():
        expected = ViewAveraged(model)(torch.from_numpy(images).float().div(255).unsqueeze(1)).exp().numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert not np.allclose(probabilities, _expected_probabilities(checkpoint_path, good), atol=1e-5)


def test_predict_files_reports_failures_and_keeps_order(checkpoint_path, inputs):
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint)
    paths = [inputs["corrupt"], inputs["lone"], inputs["folder"] / "scan.dcm"]
    results, failures = predict_files(model, checkpoint, paths, batch_size=32)
    assert [row["path"] for row in results] == [str(inputs["lone"]), str(inputs["folder"] / "scan.dcm")]
    assert len(failures) == 1
    assert failures[0][0] == inputs["corrupt"]
    assert str(inputs["corrupt"]) not in failures[0][1], "the reason should not repeat the path"
    one_by_one = [predict_files(model, checkpoint, [path], batch_size=1)[0][0] for path in paths[1:]]
    for batched, single in zip(results, one_by_one):
        assert batched["predicted"] == single["predicted"]
        for name in CLASSES:
            assert batched["probabilities"][name] == pytest.approx(single["probabilities"][name], abs=1e-5)


def test_gradcam_writes_one_png_per_image_without_overwriting_same_stems(checkpoint_path, inputs, tmp_path, capsys):
    out_dir = tmp_path / "cams"
    main([str(checkpoint_path), str(inputs["folder"]), str(inputs["corrupt"]), "--gradcam", str(out_dir)])
    written = sorted(path.name for path in out_dir.iterdir())
    assert written == ["chest_2_gradcam.png", "chest_gradcam.png", "scan_gradcam.png"]
    for name in written:
        with Image.open(out_dir / name) as image:
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
            assert image.mode == "RGB"
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1 + len(GOOD_IN_FOLDER)
    assert len(_skipped_lines(err)) == 1


def test_only_bad_files_exit_1_with_a_message(checkpoint_path, inputs, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([str(checkpoint_path), str(inputs["corrupt"])])
    assert excinfo.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(_skipped_lines(err)) == 1
    assert "nothing was predicted" in err


@pytest.mark.parametrize("problem", ["missing_model", "not_a_model", "missing_input", "empty_folder"])
def test_unusable_model_or_input_is_one_line_and_exit_1(problem, checkpoint_path, inputs, tmp_path, capsys):
    model, image = checkpoint_path, inputs["lone"]
    if problem == "missing_model":
        model = tmp_path / "nope.pt"
    elif problem == "not_a_model":
        model = inputs["lone"]
    elif problem == "missing_input":
        image = tmp_path / "typo.png"
    else:
        image = tmp_path / "empty"
        image.mkdir()
    with pytest.raises(SystemExit) as excinfo:
        main([str(model), str(image)])
    assert excinfo.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert str(model if problem.endswith("model") else image) in lines[0]


@pytest.mark.parametrize("argv", [[], ["model.pt"], ["model.pt", "x.png", "--batch-size", "0"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_console_script(checkpoint_path, inputs):
    script = Path(sys.executable).with_name("cxr-predict")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "cxr.predict"]
    completed = subprocess.run(
        [*command, str(checkpoint_path), str(inputs["lone"]), "--json"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    (row,) = json.loads(completed.stdout)
    assert row["path"] == str(inputs["lone"])
    assert row["predicted"] in CLASSES
