"""Bad input files (issue 28, cases 9-11): checkpoints, the ``evaluate.groups`` CSV and ``params.yaml``.

Each case builds its tiny input, runs it through the entry point a user reaches it by
(``cxr-predict``, the evaluate stage, ``load_params``) and expects exactly one line naming the
file or key, exit status 1, no traceback, and the user's files as they were.
"""

from __future__ import annotations

import copy
import logging
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from cxr.errors import PipelineError
from cxr.evaluation.external import image_sizes, load_scorers
from cxr.params import CLASSES, GroupsParams, load_params
from cxr.predict import main as predict_main
from cxr.reporting.subgroups import load_groups, log_matches, subgroup_report, subgroups_markdown
from cxr.training.models import build_model

from conftest import write_processed

ROOT = Path(__file__).resolve().parents[1]
MODEL_ARGS = {"arch": "custom_cnn", "num_classes": 3, "mean": [0.5], "std": [0.25], "width": 4}
CPU = torch.device("cpu")


def good_checkpoint() -> dict[str, Any]:
    """A tiny untrained custom CNN as the training stage saves it (width 4: a 32-feature head)."""
    torch.manual_seed(0)
    model = build_model(**MODEL_ARGS)
    return {"model": model.state_dict(), "model_args": dict(MODEL_ARGS), "approach": "custom",
            "classes": list(CLASSES), "image_size": 32}


def changed(**changes: Any) -> Callable[[Path], None]:
    """A writer of the good checkpoint with keys replaced (or removed, for ``None``)."""
    def write(path: Path) -> None:
        checkpoint = {**good_checkpoint(), **changes}
        torch.save({key: value for key, value in checkpoint.items() if value is not None}, path)
    return write


def with_weights(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        checkpoint = good_checkpoint()
        edit(checkpoint["model"])
        torch.save(checkpoint, path)
    return write


NOT_OURS = "{path} is not a checkpoint written by this pipeline"
CHECKPOINT_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty_file": (lambda path: path.write_bytes(b""), "{path} is not a model checkpoint: the file is empty"),
    "a_list": (lambda path: torch.save([1, 2], path), NOT_OURS + " (it holds a list)"),
    "no_classes": (changed(classes=None), NOT_OURS + " (no 'classes' key)"),
    "no_image_size": (changed(image_size=None), NOT_OURS + " (no 'image_size' key)"),
    "no_approach": (changed(approach=None), NOT_OURS + " (no 'approach' key)"),
    "image_size_true": (changed(image_size=True),
                        "{path}: checkpoint key 'image_size' must be a whole number of pixels from 32 to 1024, got True"),
    "image_size_tiny": (changed(image_size=8),
                        "{path}: checkpoint key 'image_size' must be a whole number of pixels from 32 to 1024, got 8"),
    "image_size_float": (changed(image_size=32.0),
                         "{path}: checkpoint key 'image_size' must be a whole number of pixels from 32 to 1024, got 32.0"),
    "classes_a_string": (changed(classes="COVID19"),
                         "{path}: checkpoint key 'classes' must be a non-empty list of class names, got 'COVID19'"),
    "classes_numbers": (changed(classes=[0, 1, 2]),
                        "{path}: checkpoint key 'classes' must be a non-empty list of class names, got [0, 1, 2]"),
    "classes_empty": (changed(classes=[]),
                      "{path}: checkpoint key 'classes' must be a non-empty list of class names, got []"),
    "model_not_weights": (changed(model="weights"),
                          "{path}: checkpoint key 'model' must be a state_dict of named tensors, got 'weights'"),
    "model_args_a_list": (changed(model_args=["custom_cnn"]),
                          "{path}: checkpoint key 'model_args' must be a mapping of build_model arguments, "
                          "got ['custom_cnn']"),
    "unknown_arch": (changed(model_args={**MODEL_ARGS, "arch": "vgg"}),
                     "{path}: checkpoint key 'model_args' does not describe a model "
                     "(unknown architecture 'vgg'; allowed: custom_cnn, resnet18)"),
    "unknown_model_arg": (changed(model_args={**MODEL_ARGS, "depth": 3}),
                          "{path}: checkpoint key 'model_args' does not describe a model "
                          "(build_model() got an unexpected keyword argument 'depth')"),
    "shape_mismatch": (changed(model_args={**MODEL_ARGS, "num_classes": 2}),
                       "{path}: the weights do not match the model its model_args describe: "
                       "head.1.weight: checkpoint [3, 32], model [2, 32] (and 1 more)"),
    "missing_parameter": (with_weights(lambda state: state.pop("head.1.bias")),
                          "{path}: the weights do not match the model its model_args describe: "
                          "head.1.bias missing from the checkpoint (model [3])"),
    "unexpected_parameter": (with_weights(lambda state: state.update({"extra.weight": torch.zeros(2)})),
                             "{path}: the weights do not match the model its model_args describe: "
                             "extra.weight is in the checkpoint but not in the model"),
}


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes, to show a run left the user's files as they were."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (40, 1))).save(path)
    return path


# --- checkpoints through cxr-predict -----------------------------------------------------------------


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_a_bad_checkpoint_stops_cxr_predict_with_one_line(case, tmp_path, capsys):
    write, expected = CHECKPOINT_CASES[case]
    user = tmp_path / "user"
    user.mkdir()
    model = user / "model.pt"
    write(model)
    image = write_image(user / "scan.png")
    before = contents(user)

    with pytest.raises(SystemExit) as excinfo:
        predict_main([str(model), str(image)])

    assert excinfo.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {expected.format(path=model)}\n"
    assert contents(user) == before


def test_cxr_predict_process_reports_an_empty_checkpoint_without_a_traceback(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    image = write_image(tmp_path / "scan.png")

    done = subprocess.run([sys.executable, "-m", "cxr.predict", str(model), str(image)],
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"error: {model} is not a model checkpoint: the file is empty\n"


def test_a_good_checkpoint_still_predicts(tmp_path, capsys):
    model = tmp_path / "model.pt"
    changed()(model)
    predict_main([str(model), str(write_image(tmp_path / "scan.png")), "--json"])
    assert [row["path"] for row in yaml.safe_load(capsys.readouterr().out)] == [str(tmp_path / "scan.png")]


# --- checkpoints where the external stage reads them ---------------------------------------------------


@pytest.mark.parametrize("case", ["empty_file", "no_classes", "no_image_size", "image_size_true", "shape_mismatch"])
def test_a_bad_checkpoint_is_one_line_where_external_reads_it(case, tmp_path):
    write, expected = CHECKPOINT_CASES[case]
    model = tmp_path / "custom.pt"
    write(model)
    validated_at_load = case != "shape_mismatch"  # image_sizes reads the file without building the model

    with pytest.raises(PipelineError) as excinfo:
        load_scorers({"custom": model}, list(CLASSES), [], CPU)
    assert str(excinfo.value) == expected.format(path=model)
    if validated_at_load:
        with pytest.raises(PipelineError) as excinfo:
            image_sizes({"custom": model})
        assert str(excinfo.value) == expected.format(path=model)
    else:
        assert image_sizes({"custom": model}) == [32]


# --- the evaluate stage: its checkpoint and the evaluate.groups CSV ---------------------------------


def evaluate_project(tmp_path: Path, groups: dict[str, str] | None = None) -> Path:
    """A temporary project that evaluate@custom can run in: params, a tiny model, 1 + 3 images per class.

    ``train.threads`` 0 and no host memory reuse leave the process as it was when the stage
    runs inside the test process.
    """
    project = tmp_path / "project"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update(threads=0, device="cpu", reuse_freed_memory=False)
    raw["evaluate"].update(gradcam_per_class=1, tta=[], groups=groups)
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_processed(project / "data" / "processed", {"val": 1, "test": 3})
    (project / "models").mkdir()
    changed()(project / "models" / "custom.pt")
    return project


def run_evaluate(project: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run stages/evaluate.py custom as ``python`` would, in this process (fast); returns its exit status."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "stages" / "evaluate.py"), "custom"])
    try:
        runpy.run_path(str(ROOT / "stages" / "evaluate.py"), run_name="__main__")
    except SystemExit as exit:
        return int(exit.code)
    return 0


def test_evaluate_process_reports_a_checkpoint_without_classes_in_one_line(tmp_path):
    project = evaluate_project(tmp_path)
    changed(classes=None)(project / "models" / "custom.pt")
    before = contents(project)

    done = subprocess.run([sys.executable, str(ROOT / "stages" / "evaluate.py"), "custom"], cwd=project,
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"error: {NOT_OURS.format(path='models/custom.pt')} (no 'classes' key)\n"
    assert contents(project) == before


@pytest.mark.parametrize("case", ["empty_file", "no_image_size", "image_size_true", "unknown_arch"])
def test_a_bad_checkpoint_stops_the_evaluate_stage_with_one_line(case, tmp_path, monkeypatch, capsys):
    write, expected = CHECKPOINT_CASES[case]
    project = evaluate_project(tmp_path)
    write(project / "models" / "custom.pt")
    before = contents(project)

    assert run_evaluate(project, monkeypatch) == 1
    assert capsys.readouterr().err == f"error: {expected.format(path='models/custom.pt')}\n"
    assert contents(project) == before


TEST_PATHS = [f"test/{i}.jpg" for i in range(9)]  # what write_processed names the 3 x 3 test images


def write_csv(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


GROUPS_CASES: dict[str, tuple[str | bytes, str]] = {
    "empty": ("", "evaluate.groups: {csv} is empty"),
    "header_only": ("file,source_repo\n", "evaluate.groups: {csv} has no rows"),
    "latin1": ("file,source_repo\ntest/0.jpg,S\xe3o Paulo\n".encode("latin-1"),
               "evaluate.groups: {csv} is not UTF-8 text"),
    "unclosed_quote": ('file,source_repo\n"test/0.jpg,a\n',
                       "evaluate.groups: {csv} is not a readable CSV: Error tokenizing data. "
                       "C error: EOF inside string starting at row 1"),
    "no_group_column": ("file,site\ntest/0.jpg,a\n", "evaluate.groups: {csv} has no column 'source_repo'"),
    "two_groups_for_one_image": ("file,source_repo\nData/test/0.jpg,a\ntest/1.jpg,a\ntest/0.jpg,b\n",
                                 "evaluate.groups: {csv} lists 'test/0.jpg' twice with different groups: 'a' and 'b'"),
    "a_folder": (b"", "evaluate.groups.csv: no such file {csv}"),
}


@pytest.mark.parametrize("case", list(GROUPS_CASES))
def test_a_bad_groups_csv_stops_the_evaluate_stage_with_one_line(case, tmp_path, monkeypatch, capsys):
    text, expected = GROUPS_CASES[case]
    csv = tmp_path / "groups.csv"
    if case == "a_folder":
        csv.mkdir()
    else:
        write_csv(csv, text)
    project = evaluate_project(tmp_path, {"csv": str(csv)})
    before = contents(tmp_path)

    assert run_evaluate(project, monkeypatch) == 1
    assert capsys.readouterr().err == f"error: {expected.format(csv=csv)}\n"
    assert contents(tmp_path) == before  # no output written, the CSV as it was


@pytest.mark.parametrize(
    ("listed", "expected"),
    [
        # every test image, half of them written with the data set's Data/ prefix, one listed twice in one group
        ([f"Data/{p}" if i % 2 else p for i, p in enumerate(TEST_PATHS)] + ["test/0.jpg"],
         [("INFO", "evaluate.groups: 9 of 9 test images matched a row of {csv}")]),
        (["test/0.jpg", "test/1.jpg", "test/2.jpg", "test/3.jpg", "elsewhere/4.jpg"],
         [("INFO", "evaluate.groups: 4 of 9 test images matched a row of {csv}"),
          ("WARNING", "evaluate.groups: 5 of 9 test images match no row of {csv}; "
                      "its column 'file' should hold paths like 'test/0.jpg'")]),
    ],
    ids=["all_match", "most_unmatched"],
)
def test_the_evaluate_stage_logs_how_many_test_images_the_groups_csv_matches(listed, expected, tmp_path, monkeypatch,
                                                                              caplog):
    csv = tmp_path / "groups.csv"
    pd.DataFrame({"file": listed, "source_repo": ["site"] * len(listed)}).to_csv(csv, index=False)
    project = evaluate_project(tmp_path, {"csv": str(csv)})

    with caplog.at_level(logging.INFO, logger="cxr.reporting.subgroups"):
        assert run_evaluate(project, monkeypatch) == 0

    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "cxr.reporting.subgroups"]
    assert logged == [(level, message.format(csv=csv)) for level, message in expected]
    assert len(pd.read_csv(project / "metrics" / "predictions" / "custom.csv")) == 9


# --- the groups CSV in the library: duplicates and the Markdown table --------------------------------


def test_an_image_listed_twice_in_the_same_group_counts_once(tmp_path):
    csv = write_csv(tmp_path / "groups.csv", "file,source_repo\nData/test/0.jpg,a\ntest/0.jpg,a\ntest/1.jpg,b\n")
    groups = load_groups(GroupsParams(csv=str(csv)))
    assert groups.to_dict() == {"test/0.jpg": "a", "test/1.jpg": "b"}


def test_log_matches_counts_paths_with_or_without_data(tmp_path, caplog):
    settings = GroupsParams(csv="groups.csv")
    groups = pd.Series(["a", "b"], index=["test/0.jpg", "test/1.jpg"])
    with caplog.at_level(logging.INFO, logger="cxr.reporting.subgroups"):
        assert log_matches(settings, groups, pd.Series(["Data/test/0.jpg", "test/1.jpg", "test/2.jpg"])) == 2
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "evaluate.groups: 2 of 3 test images matched a row of groups.csv")]


def test_group_names_cannot_break_the_markdown_table():
    name = "north|south\nwing *A*"
    frame = pd.DataFrame({"path": ["test/0.jpg"] * 10, "label": ["NORMAL"] * 10, "predicted": ["NORMAL"] * 10})
    report = subgroup_report({"custom": frame}, pd.Series([name], index=["test/0.jpg"]), list(CLASSES), 20, 0)
    assert list(report["custom"]["groups"]) == [name]  # the JSON keeps the raw name

    text = subgroups_markdown(report, list(CLASSES), "site|wing")

    table = [line for line in text.splitlines() if line.startswith("| north")]
    assert table == [r"| north\|south wing \*A\* | 10 | 1.000 [1.000, 1.000] | - | 1.000 [1.000, 1.000] | - |"]
    assert r"(worst group: north\|south wing \*A\*)" in text
    assert r"grouped by site\|wing;" in text


# --- params.yaml ---------------------------------------------------------------------------------------


COMMITTED = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("section, key", [("split", "seed"), ("train", "seed"), ("compare", "bootstrap_seed")])
@pytest.mark.parametrize("value", [-1, 2**32, 10**30])
def test_a_seed_numpy_cannot_take_is_one_line(section, key, value, tmp_path):
    raw = copy.deepcopy(COMMITTED)
    raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))

    with pytest.raises(PipelineError) as excinfo:
        load_params(path)

    assert str(excinfo.value) == f"params.yaml: {section}.{key} is {value}; allowed: >= 0 and <= 4294967295"


@pytest.mark.parametrize("value", [0, 2**32 - 1])
def test_every_numpy_seed_is_accepted(value, tmp_path):
    raw = copy.deepcopy(COMMITTED)
    for section, key in (("split", "seed"), ("train", "seed"), ("compare", "bootstrap_seed")):
        raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(path)
    assert (params.split.seed, params.train.seed, params.compare.bootstrap_seed) == (value, value, value)


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes((ROOT / "params.yaml").read_bytes() + "# S\xe3o Paulo\n".encode("latin-1"))
    before = path.read_bytes()
    bad_byte = before.index(b"\xe3")

    with pytest.raises(PipelineError) as excinfo:
        load_params(path)

    assert str(excinfo.value) == f"{path} is not UTF-8 text (byte {bad_byte})"
    assert path.read_bytes() == before


def test_a_folder_named_params_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.mkdir()
    with pytest.raises(PipelineError) as excinfo:
        load_params(path)
    assert str(excinfo.value) == f"{path} is a folder, not a file"
    assert path.is_dir() and not any(path.iterdir())


def test_an_unreadable_params_file_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    path.write_text("data: {}\n")

    def refuse(self: Path, *args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)  # the tests may run as root, whom chmod does not stop
    with pytest.raises(PipelineError) as excinfo:
        load_params(path)
    assert str(excinfo.value) == f"cannot read {path}: Permission denied"
