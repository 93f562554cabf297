"""params.yaml validation: every mistake is one line that names the key and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from cxr.errors import PipelineError
from cxr.params import CLASSES, AugmentParams, Params, TrainParams, as_dict, load_params, parse_params

COMMITTED = Path(__file__).resolve().parents[1] / "params.yaml"
_COMMITTED_RAW = yaml.safe_load(COMMITTED.read_text())


def committed_raw() -> dict[str, Any]:
    """A fresh deep copy of the committed params, to be broken by one test."""
    return copy.deepcopy(_COMMITTED_RAW)


def with_value(dotted: str, value: Any) -> dict[str, Any]:
    raw = committed_raw()
    *parents, last = dotted.split(".")
    section = raw
    for name in parents:
        section = section[name]
    section[last] = value
    return raw


def without(dotted: str) -> dict[str, Any]:
    raw = committed_raw()
    *parents, last = dotted.split(".")
    section = raw
    for name in parents:
        section = section[name]
    del section[last]
    return raw


def error_of(raw: Any) -> str:
    with pytest.raises(PipelineError) as excinfo:
        parse_params(raw)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("params.yaml: ")
    return message


def test_committed_params_load_with_their_values():
    params = load_params(COMMITTED)

    assert isinstance(params, Params)
    assert params.data.classes == list(CLASSES)
    assert params.preprocess.image_size == _COMMITTED_RAW["preprocess"]["image_size"]
    assert params.train_custom.epochs == _COMMITTED_RAW["train_custom"]["epochs"]
    assert params.train_custom.lr == _COMMITTED_RAW["train_custom"]["lr"]
    assert params.train_extract.weights == _COMMITTED_RAW["train_extract"]["weights"]
    assert params.train_finetune.augment.enabled is _COMMITTED_RAW["train_finetune"]["augment"]["enabled"]
    assert isinstance(params.train_custom.augment, AugmentParams)
    assert params == parse_params(committed_raw())


def test_integers_are_accepted_where_numbers_are_and_become_floats():
    params = parse_params(with_value("train_custom.augment.rotation_deg", 7))

    assert params.train_custom.augment.rotation_deg == 7.0
    assert type(params.train_custom.augment.rotation_deg) is float


def test_absent_optional_keys_take_their_defaults():
    params = parse_params(without("train_custom.width"))

    assert params.train_custom.width == TrainParams().width


def test_approach_returns_that_stage_recipe():
    params = load_params(COMMITTED)

    assert params.approach("custom") is params.train_custom
    assert params.approach("extract") is params.train_extract
    assert params.approach("finetune") is params.train_finetune


def test_as_dict_round_trips_through_parse_params():
    params = load_params(COMMITTED)

    assert parse_params(as_dict(params)) == params


@pytest.mark.parametrize(
    ("raw", "key", "allowed"),
    [
        ({**committed_raw(), "trainn": {"seed": 1}}, "trainn", "data, split, audit, preprocess, train,"),
        (with_value("train_custom.lrr", 0.1), "train_custom.lrr", "epochs, batch_size, optimizer, lr,"),
        (with_value("train_custom.augment.foo", 1), "train_custom.augment.foo", "enabled, rotation_deg,"),
    ],
)
def test_unknown_keys_are_named_with_the_allowed_ones(raw, key, allowed):
    message = error_of(raw)

    assert f"unknown key {key};" in message
    assert allowed in message


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("train_custom.epochs", "ten", "train_custom.epochs must be an integer, got 'ten'"),
        ("train_custom.epochs", True, "train_custom.epochs must be an integer, got True"),
        ("train_custom.epochs", 10.5, "train_custom.epochs must be an integer, got 10.5"),
        ("train_custom.lr", "fast", "train_custom.lr must be a number, got 'fast'"),
        ("train_custom.lr", False, "train_custom.lr must be a number, got False"),
        ("train.channels_last", "yes", "train.channels_last must be true or false, got 'yes'"),
        ("train.channels_last", 1, "train.channels_last must be true or false, got 1"),
        ("data.source", None, "data.source must be a string, got None"),
        ("data.classes", "COVID19", "data.classes must be a list of a string, got 'COVID19'"),
        ("data.classes", ["COVID19", 2, "PNEUMONIA"], "data.classes[1] must be a string, got 2"),
        ("train_custom", 5, "train_custom must be a mapping of keys, got 5"),
        ("train_custom.augment", [], "train_custom.augment must be a mapping of keys, got []"),
    ],
)
def test_wrong_types_name_the_key_and_expected_type(dotted, value, expected):
    assert error_of(with_value(dotted, value)) == f"params.yaml: {expected}"


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("train_custom.lr", 0, "train_custom.lr is 0.0; allowed: > 0.0 and <= 10.0"),
        ("train_custom.lr", -0.001, "train_custom.lr is -0.001; allowed: > 0.0 and <= 10.0"),
        ("train_custom.lr", float("nan"), "train_custom.lr is nan; allowed: > 0.0 and <= 10.0"),
        ("preprocess.image_size", 16, "preprocess.image_size is 16; allowed: >= 32 and <= 1024"),
        ("preprocess.image_size", 4096, "preprocess.image_size is 4096; allowed: >= 32 and <= 1024"),
        ("split.val_fraction", 0, "split.val_fraction is 0.0; allowed: > 0.0 and <= 0.5"),
        ("train_finetune.patience", -1, "train_finetune.patience is -1; allowed: >= 0 and <= 10000"),
        (
            "train_custom.augment.rotation_deg",
            90,
            "train_custom.augment.rotation_deg is 90.0; allowed: >= 0.0 and <= 45.0",
        ),
    ],
)
def test_out_of_range_values_name_the_key_and_bounds(dotted, value, expected):
    assert error_of(with_value(dotted, value)) == f"params.yaml: {expected}"


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("preprocess.image_size", 32),
        ("split.val_fraction", 0.5),
        ("train_finetune.patience", 0),
        ("train_custom.lr", 10),
    ],
)
def test_inclusive_bounds_are_accepted(dotted, value):
    params = parse_params(with_value(dotted, value))

    section, name = dotted.split(".")
    assert getattr(getattr(params, section), name) == value


@pytest.mark.parametrize(
    ("dotted", "value", "allowed"),
    [
        ("train_custom.optimizer", "adam", "adamw, sgd"),
        ("train_extract.scheduler", "step", "onecycle, cosine, none"),
        ("train.device", "gpu", "auto, cpu, cuda, mps"),
        ("train.amp", "fp8", "none, bf16, fp16"),
    ],
)
def test_unknown_choices_list_the_allowed_ones(dotted, value, allowed):
    assert error_of(with_value(dotted, value)) == f"params.yaml: {dotted} is {value!r}; allowed: {allowed}"


@pytest.mark.parametrize("section", ["train_extract", "train_finetune"])
def test_unknown_pretrained_weights_are_rejected(section):
    message = error_of(with_value(f"{section}.weights", "resnet18"))

    assert message == (
        f"params.yaml: {section}.weights is 'resnet18'; allowed: imagenet, none, or a path to a .pt/.pth state_dict"
    )


@pytest.mark.parametrize("weights", ["imagenet", "none", "weights/resnet18.pth", "/abs/r18.pt"])
def test_known_weights_and_state_dict_paths_are_accepted(weights):
    assert parse_params(with_value("train_extract.weights", weights)).train_extract.weights == weights


def test_custom_cnn_cannot_use_pretrained_weights():
    message = error_of(with_value("train_custom.weights", "imagenet"))

    assert "train_custom.weights must be none" in message


@pytest.mark.parametrize(
    "classes",
    [
        ["COVID19", "NORMAL"],
        ["COVID19", "NORMAL", "PNEUMONIA", "TB"],
        ["COVID19", "NORMAL", "NORMAL"],
        ["COVID19", "NORMAL", "PNEUMONIA", "PNEUMONIA"],
        ["covid19", "normal", "pneumonia"],
        [],
    ],
)
def test_classes_must_be_exactly_the_three_classes(classes):
    assert error_of(with_value("data.classes", classes)) == (
        "params.yaml: data.classes must list exactly COVID19, NORMAL, PNEUMONIA"
    )


def test_a_missing_section_is_named():
    assert error_of(without("evaluate")) == "params.yaml: missing section evaluate"


def test_load_params_reports_a_missing_file(tmp_path):
    missing = tmp_path / "nope" / "params.yaml"

    with pytest.raises(PipelineError) as excinfo:
        load_params(missing)

    assert str(excinfo.value) == f"params file not found: {missing}"


def test_load_params_reports_invalid_yaml_in_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  source: [kaggle\nsplit:\n  seed: 1\n")

    with pytest.raises(PipelineError) as excinfo:
        load_params(path)

    message = str(excinfo.value)
    assert message.startswith(f"{path} is not valid YAML: ")
    assert "\n" not in message


def test_load_params_validates_what_it_reads(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(with_value("train_custom.epochs", "ten")))

    with pytest.raises(PipelineError, match=r"^params\.yaml: train_custom\.epochs must be an integer"):
        load_params(path)


def test_an_empty_file_reports_the_first_missing_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("# nothing yet\n")

    with pytest.raises(PipelineError) as excinfo:
        load_params(path)

    assert str(excinfo.value) == "params.yaml: missing section data"


def test_a_yaml_list_instead_of_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- data\n- split\n")

    with pytest.raises(PipelineError) as excinfo:
        load_params(path)

    assert str(excinfo.value) == "params.yaml: the file must be a mapping of keys, got ['data', 'split']"


def test_a_round_trip_through_a_written_file_keeps_every_value(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(with_value("train_extract.lr", 0.02)))

    params = load_params(path)

    assert params.train_extract.lr == 0.02
    assert params.train_custom == load_params(COMMITTED).train_custom


def test_tta_names_approaches_and_defaults_to_the_custom_cnn():
    assert error_of(with_value("evaluate.tta", ["custom", "resnet"])) == (
        "params.yaml: evaluate.tta lists 'resnet'; allowed: custom, extract, finetune"
    )
    assert parse_params(without("evaluate.tta")).evaluate.tta == ["custom"]
    assert parse_params(with_value("evaluate.tta", [])).evaluate.tta == []


def _list_keys(section: dict[str, Any], prefix: str = "") -> dict[str, list[Any]]:
    keys: dict[str, list[Any]] = {}
    for name, value in section.items():
        if isinstance(value, dict):
            keys.update(_list_keys(value, f"{prefix}{name}."))
        elif isinstance(value, list):
            keys[f"{prefix}{name}"] = value
    return keys


@pytest.mark.parametrize(("key", "committed"), _list_keys(_COMMITTED_RAW).items())
def test_dvc_exp_run_set_param_rewrites_keep_params_yaml_valid(tmp_path, key, committed):
    """``dvc exp run -S`` rewrites params.yaml (ruamel); a list with a comment after it came back unparsable."""
    apply_overrides = pytest.importorskip("dvc.utils.hydra").apply_overrides
    path = tmp_path / "params.yaml"
    path.write_text(COMMITTED.read_text())
    value = list(reversed(committed)) if len(committed) > 1 else []

    apply_overrides(str(path), ["train_custom.epochs=5"])
    apply_overrides(str(path), [f"{key}=[{','.join(value)}]"])

    section, name = key.split(".")
    params = as_dict(load_params(path))
    assert params["train_custom"]["epochs"] == 5
    assert params[section][name] == value


def test_of_several_mistakes_unknown_keys_are_reported_first():
    """One error is shown; a typo'd section name explains the "missing section" it also causes."""
    raw = committed_raw()
    raw["evalute"] = raw.pop("evaluate")
    raw["data"]["source"] = None

    assert error_of(raw).startswith("params.yaml: unknown key evalute; allowed keys at the top level: data, split,")


def test_of_several_mistakes_the_first_in_file_order_is_reported():
    raw = with_value("train_custom.epochs", "ten")
    raw["preprocess"]["image_size"] = 16
    raw["train_custom"]["zz"] = 1
    raw["train_custom"]["aa"] = 1

    assert error_of(raw) == "params.yaml: preprocess.image_size is 16; allowed: >= 32 and <= 1024"
    del raw["preprocess"]["image_size"]
    assert error_of(raw).startswith("params.yaml: unknown key train_custom.aa; allowed keys in train_custom: epochs,")


def test_yaml_1_1_exponent_strings_are_numbers():
    params = load_params(COMMITTED)
    raw = yaml.safe_load(COMMITTED.read_text().replace("lr: 0.003", "lr: 3e-3"))

    assert raw["train_custom"]["lr"] == "3e-3"
    assert parse_params(raw) == params
    assert error_of(with_value("train_custom.lr", "1e-30x")) == "params.yaml: train_custom.lr must be a number, got '1e-30x'"


def test_a_choice_that_is_not_a_string_is_a_type_error():
    assert error_of(with_value("train.device", 5)) == "params.yaml: train.device must be a string, got 5"


def test_sections_are_frozen_and_copied_with_changes():
    params = load_params(COMMITTED)
    recipe = params.train_extract.model_copy(update={"cache_embeddings": False})

    with pytest.raises(ValueError):
        params.train_extract.epochs = 1  # type: ignore[misc]
    assert recipe.cache_embeddings is False and recipe.lr == params.train_extract.lr
    assert as_dict(params.model_copy(update={"train_extract": recipe}))["train_extract"]["cache_embeddings"] is False
