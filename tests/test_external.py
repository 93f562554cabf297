"""External validation: sets fetched like data.source, scored like the evaluate stage, compared with the internal test.

Fast tests drive the library on generated images and tiny untrained checkpoints; one slow test
runs ``dvc repro`` in a project copy, then adds an external set and checks that only the
external and compare stages rerun (no training stage) and that the summary gains the table.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cxr import stats
from cxr.approaches import APPROACHES, ENSEMBLE
from cxr.errors import PipelineError
from cxr.evaluation.external_scoring import (
    check_sets,
    decode_set,
    fetch_external,
    internal_predictions,
    kaggle_handle_of,
    list_images,
    load_scorers,
    predict_images,
    score_set,
)
from cxr.evaluation.tta import ViewAveraged
from cxr.files import read_json
from cxr.reporting.external_report import gap_interval, index_markdown, macro_f1_over, set_markdown, set_report
from cxr.training.models import build_model

from conftest import CLASSES, make_kaggle_tree, make_kaggle_zip
from test_pipeline import ROOT, _env, copy_project, ran_stages, sh

EQUAL = {name: 1 / 3 for name in APPROACHES}


def plain_set(root: Path, per_class: dict[str, int], top: str | None = None, seed: int = 3) -> Path:
    """``root[/top]/<class>/*.jpg``: plain class folders (no train/test), generated like the Kaggle ones."""
    data = make_kaggle_tree(root.parent / f".{root.name}-gen", per_class=per_class, splits=("test",),
                            classes=list(per_class), seed=seed)
    target = root / top if top else root
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(data / "test"), target)
    shutil.rmtree(data.parent)
    return root


def fetch(tmp_path: Path, source: Path | str, name: str = "elsewhere", **kwargs) -> tuple[Path, str]:
    destination = tmp_path / "data" / "external" / name
    return destination, fetch_external(name, str(source), CLASSES, destination, **kwargs)


def write_checkpoint(path: Path, approach: str, image_size: int, seed: int) -> Path:
    """A tiny untrained custom CNN saved as the training stage saves a model."""
    torch.manual_seed(seed)
    args = {"arch": "custom_cnn", "num_classes": len(CLASSES), "mean": [0.5], "std": [0.25], "width": 4}
    model = build_model(**args)
    with torch.no_grad():
        model.head[1].weight.mul_(20.0)  # confident, so views change the probabilities visibly
    checkpoint = {"model_args": args, "model": model.state_dict(), "approach": approach, "classes": list(CLASSES),
                  "image_size": image_size}
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def model_files(tmp_path: Path) -> dict[str, Path]:
    """One checkpoint per approach; finetune at another image size, as a model may be trained at."""
    (tmp_path / "models").mkdir()
    sizes = {"custom": 32, "extract": 32, "finetune": 40}
    return {name: write_checkpoint(tmp_path / "models" / f"{name}.pt", name, sizes[name], seed)
            for seed, name in enumerate(APPROACHES)}


# --- fetching and layout ----------------------------------------------------------------------------


def test_a_kaggle_layout_zip_is_scored_on_its_test_folder(tmp_path):
    destination, scope = fetch(tmp_path, make_kaggle_zip(tmp_path, top_folder="archive"))

    assert scope == "test"
    listed = list_images(destination, CLASSES)
    assert sorted(p.name for p in destination.iterdir()) == list(CLASSES)
    assert listed["label"].value_counts().to_dict() == {name: 4 for name in CLASSES}
    assert any(path.startswith("PNEUMONIA/person1000_") for path in listed["path"])  # test patients start at 1000


def test_a_kaggle_layout_without_test_folder_is_scored_whole(tmp_path):
    source = make_kaggle_tree(tmp_path / "src", per_class=3, splits=("train",)).parent

    destination, scope = fetch(tmp_path, source)

    assert scope == "all"
    assert len(list_images(destination, CLASSES)) == 9


@pytest.mark.parametrize("top", [None, "wrapped"])
def test_plain_class_folders_are_scored_whole_even_inside_a_top_folder(tmp_path, top):
    source = plain_set(tmp_path / "plain", {name: 2 for name in CLASSES}, top=top)
    (source / "LICENSE.txt").write_text("CC BY 4.0")  # loose files beside the folders are not classes

    destination, scope = fetch(tmp_path, source)

    assert scope == "all"
    assert list_images(destination, CLASSES)["label"].tolist() == ["COVID19"] * 2 + ["NORMAL"] * 2 + ["PNEUMONIA"] * 2


@pytest.mark.parametrize("layout", ["plain", "kaggle"])
def test_an_unknown_class_folder_is_one_line_naming_it_and_installs_nothing(tmp_path, layout):
    if layout == "plain":
        source = plain_set(tmp_path / "plain", {"COVID19": 2, "TUBERCULOSIS": 2})
    else:
        source = make_kaggle_tree(tmp_path / "src", per_class=2, classes=[*CLASSES, "TUBERCULOSIS"]).parent

    with pytest.raises(PipelineError) as excinfo:
        fetch(tmp_path, source)

    message = str(excinfo.value)
    assert "\n" not in message and "'TUBERCULOSIS'" in message and message.startswith("external.elsewhere:")
    assert not (tmp_path / "data" / "external" / "elsewhere").exists()
    assert [p.name for p in (tmp_path / "data" / "external").iterdir()] == []  # no temporary folder left


def test_a_kaggle_handle_is_downloaded_with_the_data_source_code(tmp_path):
    calls = []

    def fake_kaggle(handle: str, workdir: Path) -> Path:
        calls.append(handle)
        return make_kaggle_tree(workdir / "kaggle", per_class=2).parent

    destination, scope = fetch(tmp_path, "kaggle:someone/other-hospital/versions/3", kaggle=fake_kaggle)

    assert calls == ["someone/other-hospital/versions/3"] and scope == "test"
    assert len(list_images(destination, CLASSES)) == 6


def test_a_failed_kaggle_download_names_the_set(tmp_path):
    def offline(handle: str, workdir: Path) -> Path:
        raise PipelineError(f"cannot reach Kaggle to download {handle} (OSError: offline); check the network, or set "
                            "data.source to a local .zip or folder")

    with pytest.raises(PipelineError) as excinfo:
        fetch(tmp_path, "kaggle:someone/other-hospital", kaggle=offline)

    assert str(excinfo.value) == ("external.elsewhere: cannot reach Kaggle to download someone/other-hospital (OSError: "
                                  "offline); check the network, or set external.elsewhere to a local .zip or folder")


def test_a_missing_local_source_names_the_set_and_the_sources_allowed(tmp_path):
    with pytest.raises(PipelineError) as excinfo:
        fetch(tmp_path, tmp_path / "nowhere.zip")

    assert str(excinfo.value) == (f"external.elsewhere {str(tmp_path / 'nowhere.zip')!r}: no such file or folder (use "
                                  "kaggle:owner/dataset, a .zip, a folder or an https URL)")


def test_only_kaggle_prefixed_sources_are_kaggle_handles(tmp_path):
    existing = plain_set(tmp_path / "sets" / "local", {"NORMAL": 1})
    assert kaggle_handle_of("kaggle:owner/slug") == "owner/slug"
    assert kaggle_handle_of("kaggle:owner/slug/versions/2") == "owner/slug/versions/2"
    for source in ("owner/slug", "https://example.org/set.zip", "some/where.zip", str(existing), "a/b/c", "kaggle:a/b/c"):
        assert kaggle_handle_of(source) is None, source


@pytest.mark.parametrize(("sets", "fragment"), [
    ({"other": "kaggle"}, r"external.other is 'kaggle'; give the Kaggle data set instead \(kaggle:owner/dataset"),
    ({"index": "x.zip"}, "external set name 'index'"),
    ({"a/b": "x.zip"}, "external set name 'a/b'"),
])
def test_bad_set_names_and_the_bare_kaggle_source_are_refused(sets, fragment):
    with pytest.raises(PipelineError, match=fragment):
        check_sets(sets)


# --- decoding and scoring ---------------------------------------------------------------------------


def test_unreadable_files_are_skipped_and_counted_at_every_size(tmp_path):
    folder = plain_set(tmp_path / "set", {"NORMAL": 3, "PNEUMONIA": 2})
    (folder / "NORMAL" / "broken.jpeg").write_bytes(b"\x00\x07 not a jpeg at all")
    (folder / "NORMAL" / ".DS_Store").write_bytes(b"junk")  # never a candidate, so not skipped either

    decoded = decode_set(folder, list_images(folder, CLASSES), sizes=[32, 40], workers=1)

    assert {size: images.shape for size, images in decoded.images.items()} == {32: (5, 32, 32), 40: (5, 40, 40)}
    assert decoded.skipped["path"].tolist() == ["NORMAL/broken.jpeg"]
    assert "not an image" in decoded.skipped["reason"].iloc[0]
    assert "NORMAL/broken.jpeg" not in decoded.rows["path"].tolist() and len(decoded.rows) == 5


def test_a_set_without_any_readable_image_is_one_line_naming_it(tmp_path):
    folder = plain_set(tmp_path / "set", {"NORMAL": 1})
    (folder / "NORMAL" / "IM-0000-0001.jpeg").write_bytes(b"")

    with pytest.raises(PipelineError, match=r"set: no readable image to score \(1 files listed, none readable\)"):
        decode_set(folder, list_images(folder, CLASSES), sizes=[32], workers=1)


def test_each_model_is_scored_at_its_own_size_with_tta_where_evaluate_uses_it(tmp_path, model_files):
    folder = plain_set(tmp_path / "set", {name: 2 for name in CLASSES})
    decoded = decode_set(folder, list_images(folder, CLASSES), sizes=[32, 40], workers=1)
    cpu = torch.device("cpu")

    with_tta = load_scorers(model_files, CLASSES, ["custom"], cpu)
    without = load_scorers(model_files, CLASSES, [], cpu)

    assert isinstance(with_tta["custom"].model, ViewAveraged) and not isinstance(without["custom"].model, ViewAveraged)
    assert not isinstance(with_tta["extract"].model, ViewAveraged)
    assert [with_tta[name].image_size for name in APPROACHES] == [32, 32, 40]
    frames = {name: predict_images(scorer, decoded, CLASSES, 4, cpu) for name, scorer in with_tta.items()}
    plain = predict_images(without["custom"], decoded, CLASSES, 4, cpu)
    probabilities = [f"prob_{name}" for name in CLASSES]
    assert not np.allclose(frames["custom"][probabilities], plain[probabilities])
    with torch.inference_mode():  # the view-averaged probabilities, computed by hand
        x = torch.from_numpy(decoded.images[32]).unsqueeze(1).float() / 255
        expected = ViewAveraged(without["custom"].model)(x).exp().numpy()
    np.testing.assert_allclose(frames["custom"][probabilities].to_numpy(), expected, atol=2e-6)
    pd.testing.assert_frame_equal(frames["extract"], predict_images(without["extract"], decoded, CLASSES, 4, cpu))


def test_the_ensemble_uses_the_given_weights(tmp_path, model_files):
    folder = plain_set(tmp_path / "set", {name: 2 for name in CLASSES})
    decoded = decode_set(folder, list_images(folder, CLASSES), sizes=[32, 40], workers=1)
    scorers = load_scorers(model_files, CLASSES, [], torch.device("cpu"))
    weights = {"custom": 0.5, "extract": 0.3, "finetune": 0.2}

    frames = score_set(scorers, decoded, CLASSES, weights, 4, torch.device("cpu"))

    assert list(frames) == [*APPROACHES, ENSEMBLE]
    columns = [f"prob_{name}" for name in CLASSES]
    by_hand = 0.5 * frames["custom"][columns].to_numpy() + 0.3 * frames["extract"][columns].to_numpy() \
        + 0.2 * frames["finetune"][columns].to_numpy()
    np.testing.assert_allclose(frames[ENSEMBLE][columns].to_numpy(), by_hand, atol=1e-6)
    assert list(frames[ENSEMBLE]["predicted"]) == list(np.asarray(CLASSES)[by_hand.argmax(axis=1)])
    assert frames[ENSEMBLE][["path", "label"]].equals(frames["custom"][["path", "label"]])


def test_internal_predictions_add_the_ensemble(tmp_path, model_files):
    folder = plain_set(tmp_path / "set", {name: 2 for name in CLASSES})
    decoded = decode_set(folder, list_images(folder, CLASSES), sizes=[32, 40], workers=1)
    frames = score_set(load_scorers(model_files, CLASSES, [], torch.device("cpu")), decoded, CLASSES, EQUAL, 4,
                       torch.device("cpu"))
    files = {}
    for name in APPROACHES:
        files[name] = tmp_path / f"{name}.csv"
        frames[name].to_csv(files[name], index=False)

    internal = internal_predictions(files, CLASSES, EQUAL)

    np.testing.assert_allclose(internal[ENSEMBLE]["prob_NORMAL"], frames[ENSEMBLE]["prob_NORMAL"], atol=2e-6)


def test_a_set_lacking_a_class_is_scored_on_the_classes_it_has_and_says_so(tmp_path, model_files):
    folder = plain_set(tmp_path / "set", {"COVID19": 3, "NORMAL": 4})
    internal_folder = plain_set(tmp_path / "internal", {name: 3 for name in CLASSES}, seed=5)
    scorers = load_scorers(model_files, CLASSES, ["custom"], torch.device("cpu"))

    def scored(path: Path) -> dict[str, pd.DataFrame]:
        decoded = decode_set(path, list_images(path, CLASSES), sizes=[32, 40], workers=1)
        return score_set(scorers, decoded, CLASSES, EQUAL, 4, torch.device("cpu"))

    report = set_report(scored(folder), scored(internal_folder), CLASSES, resamples=50, seed=0)

    assert report["classes_present"] == ["COVID19", "NORMAL"] and report["classes_missing"] == ["PNEUMONIA"]
    assert report["n_images"] == 7 and report["images_per_class"] == {"COVID19": 3, "NORMAL": 4, "PNEUMONIA": 0}
    assert list(report["models"]) == [*APPROACHES, ENSEMBLE]
    markdown = set_markdown("elsewhere", {**report, "source": "x.zip", "scope": "all", "skipped": 0})
    assert "Classes missing from this set: PNEUMONIA" in markdown
    assert sum(line.startswith("|") for line in markdown.splitlines()) == 2 + len(APPROACHES) + 1  # + header, rule


# --- statistics -------------------------------------------------------------------------------------


def _frame(labels: np.ndarray, predicted: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(labels))], "label": np.asarray(CLASSES)[labels],
                         "predicted": np.asarray(CLASSES)[predicted]})


def test_macro_f1_over_every_class_is_the_usual_macro_f1():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert macro_f1_over([0, 1, 2], 3)(y_true, y_pred) == pytest.approx(stats.macro_f1(3)(y_true, y_pred))
    only_first = macro_f1_over([0], 3)(y_true, y_pred)
    assert only_first == pytest.approx(2 * np.sum((y_true == 0) & (y_pred == 0)) / (np.sum(y_true == 0) + np.sum(y_pred == 0)))


def test_an_external_set_equal_to_the_internal_one_has_a_gap_interval_around_zero():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 150)
    predicted = np.where(rng.random(150) < 0.8, labels, rng.integers(0, 3, 150))
    frame = _frame(labels, predicted)

    report = set_report({"custom": frame}, {"custom": frame.copy()}, CLASSES, resamples=300, seed=0)

    for metric in ("accuracy", "f1_macro"):
        gap = report["models"]["custom"]["gap"][metric]
        assert gap["value"] == 0 and gap["ci_low"] < 0 < gap["ci_high"], gap
        assert report["models"]["custom"]["internal"][metric] == report["models"]["custom"][metric]["value"]


def test_a_model_that_does_worse_outside_has_a_negative_gap_interval():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 200)
    inside = np.where(rng.random(200) < 0.95, labels, (labels + 1) % 3)
    outside = np.where(rng.random(200) < 0.6, labels, (labels + 1) % 3)

    gap = gap_interval((labels, outside), (labels, inside), stats.accuracy, resamples=300, seed=0)

    assert gap["ci_low"] <= gap["value"] <= gap["ci_high"] < 0
    assert gap == gap_interval((labels, outside), (labels, inside), stats.accuracy, resamples=300, seed=0)


def test_the_section_says_when_no_set_is_listed():
    assert "No external test sets" in index_markdown({}, 1000)
    assert index_markdown({"a": "### External set `a`\n"}, 1000).endswith("### External set `a`\n")


# --- the stage ---------------------------------------------------------------------------------------


def test_the_stage_writes_its_outputs_when_no_set_is_listed(tmp_path):
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["external"] = {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    done = subprocess.run([sys.executable, str(ROOT / "stages" / "external.py")], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    assert read_json(tmp_path / "metrics" / "external" / "index.json") == {"sets": {}}
    assert "No external test sets" in (tmp_path / "metrics" / "external" / "index.md").read_text()
    assert (tmp_path / "data" / "external").is_dir()


@pytest.mark.slow
def test_adding_an_external_set_reruns_only_external_and_compare(reproduced_mini, tmp_path):
    project = copy_project(reproduced_mini.project, tmp_path / "project")
    assert ran_stages(sh(project, "dvc", "repro")) == set()
    assert "No external test sets" in (project / "metrics" / "summary.md").read_text()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["external"] = {"elsewhere": str(make_kaggle_zip(tmp_path, top_folder="archive"))}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = sh(project, "dvc", "repro")

    assert ran_stages(log) == {"external", "compare"}, log[-3000:]
    report = read_json(project / "metrics" / "external" / "elsewhere.json")
    assert report["scope"] == "test" and report["n_images"] == 12 and report["classes_missing"] == []
    assert set(report["models"]) == {*APPROACHES, ENSEMBLE}
    for model in report["models"]:
        predictions = pd.read_csv(project / "metrics" / "external" / "elsewhere" / "predictions" / f"{model}.csv")
        assert len(predictions) == 12
    for document in ("metrics/summary.md", "reports/report.md"):
        text = (project / document).read_text()
        assert "### External set `elsewhere`" in text and "| Accuracy gap [95% CI] |" in text, document
    assert ran_stages(sh(project, "dvc", "repro")) == set()
