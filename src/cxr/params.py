"""Typed, validated view of ``params.yaml``.

Every stage loads its params through :func:`load_params`, so a typo, a wrong type or an
out-of-range value is reported as one line naming the key and what is allowed, before any
data is touched, instead of surfacing as a crash an hour into training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from cxr.approaches import APPROACHES, REGISTRY
from cxr.errors import PipelineError, first_line

Optimizer = Literal["adamw", "sgd"]
Scheduler = Literal["onecycle", "cosine", "none"]
Device = Literal["auto", "cpu", "cuda", "mps"]
AmpDtype = Literal["none", "bf16", "fp16"]
Border = Literal["keep", "hide"]
CLASSES = ("COVID19", "NORMAL", "PNEUMONIA")
OPTIMIZERS, SCHEDULERS, DEVICES, AMP_DTYPES = (get_args(choice) for choice in (Optimizer, Scheduler, Device, AmpDtype))
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024
MAX_SEED = 2**32 - 1  # numpy's seeds are unsigned 32-bit integers


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; users mean the number."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


Number = Annotated[float, BeforeValidator(_yaml_float)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class _Section(BaseModel):
    """A params section: unknown keys are typos, and strict types turn no true into 1 or 10.5 into 10.

    (Ints are still accepted where numbers are, and become floats.)
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(_Section):
    """Where the raw images come from and which classes they hold."""

    source: str = "kaggle"
    kaggle_handle: str = "prashant268/chest-xray-covid19-pneumonia/versions/1"
    classes: list[str] = list(CLASSES)


class SplitParams(_Section):
    val_fraction: Number = Field(0.15, gt=0.0, le=0.5)
    seed: Seed = 42
    dedupe: bool = False


class AuditParams(_Section):
    """Near-duplicate search across splits (perceptual hash, Hamming distance in bits of 64)."""

    threshold: int = Field(4, ge=0, le=64)
    workers: int = Field(2, ge=1, le=256)


class PreprocessParams(_Section):
    image_size: int = Field(224, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    workers: int = Field(2, ge=1, le=256)


class RuntimeParams(_Section):
    """Settings shared by every training stage: they change speed, not the experiment."""

    seed: Seed = 42
    device: Device = "auto"
    threads: int = Field(0, ge=0, le=1024)
    amp: AmpDtype = "bf16"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    reuse_freed_memory: bool = True
    gpu_data_gb: Number = Field(4.0, ge=0.0, le=100_000.0)


class AugmentParams(_Section):
    """Batched, tensor-side augmentation; small geometric and photometric jitter."""

    enabled: bool = True
    rotation_deg: Number = Field(10.0, ge=0.0, le=45.0)
    scale: Number = Field(0.10, ge=0.0, le=0.5)
    translate: Number = Field(0.06, ge=0.0, le=0.5)
    brightness: Number = Field(0.10, ge=0.0, le=1.0)
    contrast: Number = Field(0.10, ge=0.0, le=1.0)


class TrainParams(_Section):
    """One approach's training recipe (``train_custom``, ``train_extract``, ``train_finetune``)."""

    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=4096)
    optimizer: Optimizer = "adamw"
    lr: Number = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: Number = Field(0.0, ge=0.0, le=10.0)
    scheduler: Scheduler = "onecycle"
    patience: int = Field(5, ge=0, le=10_000)
    label_smoothing: Number = Field(0.0, ge=0.0, le=0.5)
    weights: str = "none"
    width: int = Field(32, ge=4, le=512)
    dropout: Number = Field(0.2, ge=0.0, le=0.9)
    cache_embeddings: bool = True
    ema_decay: Number = Field(0.0, ge=0.0, le=0.999999)
    augment: AugmentParams = AugmentParams()
    border: Border = "keep"
    lung_box: Number = Field(0.6, gt=0.0, lt=1.0)


class GroupsParams(_Section):
    """A CSV that maps test images to a group (source, site, age band, view) for the subgroup report."""

    csv: str
    path_column: str = "file"
    group_column: str = "source_repo"


class EvaluateParams(_Section):
    batch_size: int = Field(128, ge=1, le=4096)
    gradcam_per_class: int = Field(3, ge=0, le=50)
    tta: list[str] = ["custom"]  # approaches scored with test-time augmentation
    groups: GroupsParams | None = None


class ShortcutsParams(_Section):
    """The shortcut audit: does each model read the lung fields, or the film around them?"""

    center_fraction: Number = Field(0.6, gt=0.0, lt=1.0)
    probe_epochs: int = Field(10, ge=1, le=10_000)
    cam_per_class: int = Field(50, ge=1, le=100_000)
    flag_share: Number = Field(0.5, gt=0.0, le=1.0)
    probe_margin: Number = Field(0.1, ge=0.0, le=1.0)


class CompareParams(_Section):
    """Uncertainty and ensemble settings of the comparison."""

    bootstrap_resamples: int = Field(1000, ge=10, le=100_000)
    bootstrap_seed: Seed = 42
    alpha: Number = Field(0.05, gt=0.0, le=0.5)
    ensemble_weights: Literal["equal", "val_f1"] = "equal"
    temperature_scaling: bool = True
    ece_bins: int = Field(15, ge=2, le=100)


class Params(_Section):
    data: DataParams
    split: SplitParams
    audit: AuditParams
    preprocess: PreprocessParams
    train: RuntimeParams
    train_custom: TrainParams
    train_extract: TrainParams
    train_finetune: TrainParams
    evaluate: EvaluateParams
    shortcuts: ShortcutsParams
    external: dict[str, str] = {}
    compare: CompareParams

    def approach(self, name: str) -> TrainParams:
        """The training recipe of one approach (``custom``, ``extract`` or ``finetune``)."""
        return getattr(self, REGISTRY[name].section)


_TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
               "bool_type": "true or false", "list_type": "a list of a string", "literal_error": "a string"}
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _walk(loc: tuple[str | int, ...]) -> tuple[Any, Any, tuple[tuple[int, str], ...]]:
    """The model and field a pydantic error location points at, and its place in today's check order.

    The place sorts a section's unknown keys (by name) before its fields (in declared order), so
    the one error reported is the one the hand-written checks used to stop at.
    """
    model, field, place = Params, None, []
    for part in loc:
        fields = getattr(model, "model_fields", {})
        if isinstance(part, int) or part not in fields:
            place.append((part, "") if isinstance(part, int) else (-1, part))
            continue
        place.append((list(fields).index(part), ""))
        field = fields[part]
        # an optional section (``X | None``) is walked into as its model
        model = next((arg for arg in get_args(field.annotation) if hasattr(arg, "model_fields")), field.annotation)
    return model, field, tuple(place)


def _message(error: Any) -> str:
    """One line naming the dotted key of a pydantic error and what it allows there."""
    loc, kind, value = error["loc"], error["type"], error["input"]
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    model, field, _ = _walk(loc if kind != "extra_forbidden" else loc[:-1])
    if kind == "extra_forbidden":
        where = f"in {key.rpartition('.')[0]}" if len(loc) > 1 else "at the top level"
        return f"unknown key {key}; allowed keys {where}: {', '.join(model.model_fields)}"
    if kind == "missing":
        return f"missing {'section' if len(loc) == 1 else 'key'} {key}"
    if kind == "model_type":
        return f"{key or 'the file'} must be a mapping of keys, got {value!r}"
    if kind == "literal_error" and isinstance(value, str):
        return f"{key} is {value!r}; allowed: {', '.join(get_args(field.annotation))}"
    if kind in _TYPE_NAMES:
        return f"{key} must be {_TYPE_NAMES[kind]}, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bounds = [f"{sign} {getattr(rule, name)}" for rule in field.metadata for name, sign in _BOUNDS.items()
                  if hasattr(rule, name)]
        value = float(value) if field.annotation is float else value  # an int given for a number shows as one
        return f"{key} is {value!r}; allowed: {' and '.join(bounds)}"
    return f"{key}: {error['msg']}"


def _check_weights(section: str, weights: str) -> None:
    if weights in ("imagenet", "none") or weights.endswith((".pt", ".pth")):
        return
    raise PipelineError(
        f"params.yaml: {section}.weights is {weights!r}; allowed: imagenet, none, or a path to a .pt/.pth state_dict"
    )


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a params mapping (as read from YAML) and return typed params."""
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        first = min(err.errors(), key=lambda error: _walk(error["loc"])[2])
        raise PipelineError(f"params.yaml: {_message(first)}") from None
    if sorted(params.data.classes) != sorted(CLASSES) or len(params.data.classes) != len(CLASSES):
        raise PipelineError(f"params.yaml: data.classes must list exactly {', '.join(CLASSES)}")
    if params.train_custom.weights != "none":
        raise PipelineError("params.yaml: train_custom.weights must be none (the custom CNN is trained from scratch)")
    for name in ("extract", "finetune"):
        _check_weights(f"train_{name}", params.approach(name).weights)
    unknown = [name for name in params.evaluate.tta if name not in APPROACHES]
    if unknown:
        raise PipelineError(f"params.yaml: evaluate.tta lists {unknown[0]!r}; allowed: {', '.join(APPROACHES)}")
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; every problem is a one-line :class:`PipelineError`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"params file not found: {path}") from None
    except IsADirectoryError:
        raise PipelineError(f"{path} is a folder, not a file") from None
    except UnicodeDecodeError as err:
        raise PipelineError(f"{path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise PipelineError(f"cannot read {path}: {err.strerror or first_line(err)}") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path} is not valid YAML: {first_line(err)}") from None
    return parse_params(raw or {})


def as_dict(params: BaseModel) -> dict[str, Any]:
    """Plain-dict copy of (a section of) params, for checkpoints and logs."""
    return params.model_dump()
