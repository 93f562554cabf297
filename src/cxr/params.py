"""Typed, validated view of ``params.yaml``.

Every stage loads its params through :func:`load_params`, so a typo, a wrong type or an
out-of-range value is reported as one line naming the key and what is allowed, before any
data is touched, instead of surfacing as a crash an hour into training.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxr.approaches import APPROACHES, REGISTRY
from cxr.errors import PipelineError

CLASSES = ("COVID19", "NORMAL", "PNEUMONIA")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("onecycle", "cosine", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_DTYPES = ("none", "bf16", "fp16")
MIN_IMAGE_SIZE = 32


def _choices(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def _range(low: float | None = None, high: float | None = None, *, open_low: bool = False) -> dict[str, Any]:
    return {"low": low, "high": high, "open_low": open_low}


@dataclass(frozen=True)
class DataParams:
    """Where the raw images come from and which classes they hold."""

    source: str = "kaggle"
    kaggle_handle: str = "prashant268/chest-xray-covid19-pneumonia/versions/1"
    classes: list[str] = field(default_factory=lambda: list(CLASSES))


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float = field(default=0.15, metadata=_range(0.0, 0.5, open_low=True))
    seed: int = 42
    dedupe: bool = False


@dataclass(frozen=True)
class AuditParams:
    """Near-duplicate search across splits (perceptual hash, Hamming distance in bits of 64)."""

    threshold: int = field(default=4, metadata=_range(0, 64))
    workers: int = field(default=2, metadata=_range(1, 256))


@dataclass(frozen=True)
class PreprocessParams:
    image_size: int = field(default=224, metadata=_range(MIN_IMAGE_SIZE, 1024))
    workers: int = field(default=2, metadata=_range(1, 256))


@dataclass(frozen=True)
class RuntimeParams:
    """Settings shared by every training stage: they change speed, not the experiment."""

    seed: int = 42
    device: str = field(default="auto", metadata=_choices(*DEVICES))
    threads: int = field(default=0, metadata=_range(0, 1024))
    amp: str = field(default="bf16", metadata=_choices(*AMP_DTYPES))
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    reuse_freed_memory: bool = True


@dataclass(frozen=True)
class AugmentParams:
    """Batched, tensor-side augmentation; small geometric and photometric jitter."""

    enabled: bool = True
    rotation_deg: float = field(default=10.0, metadata=_range(0.0, 45.0))
    scale: float = field(default=0.10, metadata=_range(0.0, 0.5))
    translate: float = field(default=0.06, metadata=_range(0.0, 0.5))
    brightness: float = field(default=0.10, metadata=_range(0.0, 1.0))
    contrast: float = field(default=0.10, metadata=_range(0.0, 1.0))


@dataclass(frozen=True)
class TrainParams:
    """One approach's training recipe (``train_custom``, ``train_extract``, ``train_finetune``)."""

    epochs: int = field(default=10, metadata=_range(1, 10_000))
    batch_size: int = field(default=32, metadata=_range(1, 4096))
    optimizer: str = field(default="adamw", metadata=_choices(*OPTIMIZERS))
    lr: float = field(default=1e-3, metadata=_range(0.0, 10.0, open_low=True))
    weight_decay: float = field(default=0.0, metadata=_range(0.0, 10.0))
    scheduler: str = field(default="onecycle", metadata=_choices(*SCHEDULERS))
    patience: int = field(default=5, metadata=_range(0, 10_000))
    label_smoothing: float = field(default=0.0, metadata=_range(0.0, 0.5))
    weights: str = "none"
    width: int = field(default=32, metadata=_range(4, 512))
    dropout: float = field(default=0.2, metadata=_range(0.0, 0.9))
    cache_embeddings: bool = True
    ema_decay: float = field(default=0.0, metadata=_range(0.0, 0.999999))
    augment: AugmentParams = field(default_factory=AugmentParams)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = field(default=128, metadata=_range(1, 4096))
    gradcam_per_class: int = field(default=3, metadata=_range(0, 50))
    tta: list[str] = field(default_factory=lambda: ["custom"])  # approaches scored with test-time augmentation


@dataclass(frozen=True)
class CompareParams:
    """Uncertainty and ensemble settings of the comparison."""

    bootstrap_resamples: int = field(default=1000, metadata=_range(10, 100_000))
    bootstrap_seed: int = 42
    alpha: float = field(default=0.05, metadata=_range(0.0, 0.5, open_low=True))
    ensemble_weights: str = field(default="equal", metadata=_choices("equal", "val_f1"))
    temperature_scaling: bool = True
    ece_bins: int = field(default=15, metadata=_range(2, 100))


@dataclass(frozen=True)
class Params:
    data: DataParams
    split: SplitParams
    audit: AuditParams
    preprocess: PreprocessParams
    train: RuntimeParams
    train_custom: TrainParams
    train_extract: TrainParams
    train_finetune: TrainParams
    evaluate: EvaluateParams
    compare: CompareParams

    def approach(self, name: str) -> TrainParams:
        """The training recipe of one approach (``custom``, ``extract`` or ``finetune``)."""
        return getattr(self, REGISTRY[name].section)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, tp.__name__)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check one value against its annotated type; ints are accepted where numbers are."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise PipelineError(f"params.yaml: {key} must be {_type_name(tp)}, got {value!r}")
        return [_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads ``1e-3`` (no dot) as a string; users mean the number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise PipelineError(f"params.yaml: {key} must be {_type_name(tp)}, got {value!r}")
    return value


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise PipelineError(f"params.yaml: {key} is {value!r}; allowed: {', '.join(meta['choices'])}")
    low, high = meta.get("low"), meta.get("high")
    # Written as "not inside" rather than "outside", so NaN (which compares false) is rejected.
    too_low = low is not None and not (value > low if meta.get("open_low") else value >= low)
    if too_low or (high is not None and not value <= high):
        lower = f"> {low}" if meta.get("open_low") else f">= {low}"
        raise PipelineError(f"params.yaml: {key} is {value!r}; allowed: {lower} and <= {high}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise PipelineError(f"params.yaml: {prefix or 'the file'} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"in {prefix}" if prefix else "at the top level"
        raise PipelineError(
            f"params.yaml: unknown key {_join(prefix, unknown[0])}; allowed keys {where}: {', '.join(fields)}"
        )
    values = {}
    for name, spec in fields.items():
        key = _join(prefix, name)
        if name not in raw:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise PipelineError(f"params.yaml: missing section {key}")
            continue
        value = _convert(raw[name], hints[name], key)
        _check_bounds(value, spec.metadata, key)
        values[name] = value
    return cls(**values)


def _check_weights(section: str, weights: str) -> None:
    if weights in ("imagenet", "none") or weights.endswith((".pt", ".pth")):
        return
    raise PipelineError(
        f"params.yaml: {section}.weights is {weights!r}; allowed: imagenet, none, or a path to a .pt/.pth state_dict"
    )


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a params mapping (as read from YAML) and return typed params."""
    params = _build(Params, raw, "")
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
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"params file not found: {path}") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_params(raw or {})


def as_dict(params: Any) -> dict[str, Any]:
    """Plain-dict copy of (a section of) params, for checkpoints and logs."""
    return dataclasses.asdict(params)


