"""Typed, validated view of ``params.yaml``.

Every stage loads its params through :func:`load_params`, so a typo, a wrong type or an
out-of-range value is reported as one line naming the key and what is allowed, before any
data is touched, instead of surfacing as a crash an hour into training. Reading the file,
the one-line errors and the ``data`` section live in :mod:`cxr.params_core`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from cxr.approaches import APPROACHES, REGISTRY
from cxr.errors import PipelineError
from cxr.params_core import CLASSES as CLASSES  # re-exported: the label order, imported from here across the code
from cxr.params_core import DataParams, Number, Section, Seed, check_classes, read_params_file, validated

Optimizer = Literal["adamw", "sgd"]
Scheduler = Literal["onecycle", "cosine", "none"]
Device = Literal["auto", "cpu", "cuda", "mps"]
AmpDtype = Literal["none", "bf16", "fp16"]
Border = Literal["keep", "hide", "crop"]
Balance = Literal["none", "class", "group"]
Select = Literal["macro_f1", "worst_group"]
OPTIMIZERS, SCHEDULERS, DEVICES, AMP_DTYPES = (get_args(choice) for choice in (Optimizer, Scheduler, Device, AmpDtype))
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024


class SplitParams(Section):
    val_fraction: Number = Field(0.15, gt=0.0, le=0.5)
    seed: Seed = 42
    dedupe: bool = False
    unseen_groups: list[str] = []  # groups (of the ``groups`` CSV) kept out of train and val: test-only collections


class AuditParams(Section):
    """Near-duplicate search across splits (perceptual hash, Hamming distance in bits of 64)."""

    threshold: int = Field(4, ge=0, le=64)
    workers: int = Field(2, ge=1, le=256)


class PreprocessParams(Section):
    image_size: int = Field(224, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    workers: int = Field(2, ge=1, le=256)


class RuntimeParams(Section):
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


class AugmentParams(Section):
    """Batched, tensor-side augmentation; small geometric and photometric jitter."""

    enabled: bool = True
    rotation_deg: Number = Field(10.0, ge=0.0, le=45.0)
    scale: Number = Field(0.10, ge=0.0, le=0.5)
    translate: Number = Field(0.06, ge=0.0, le=0.5)
    brightness: Number = Field(0.10, ge=0.0, le=1.0)
    contrast: Number = Field(0.10, ge=0.0, le=1.0)


class TrainParams(Section):
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
    balance: Balance = "none"  # draw each epoch so every class, or (group, class) cell, weighs the same
    select: Select = "macro_f1"  # the validation score that picks the epoch kept

    @property
    def uses_groups(self) -> bool:
        """Whether training reads each image's group (the groups CSV): to balance by group, or to select by the worst."""
        return self.balance == "group" or self.select == "worst_group"


class GroupsParams(Section):
    """A CSV that maps images to a group (source, site, age band, view); ``csv: null`` turns groups off.

    Split reads it to hold collections out (``split.unseen_groups``), evaluate checks it,
    compare scores each group, and training reads it for ``balance: group`` and ``select: worst_group``.
    """

    csv: str | None = None
    path_column: str = "file"
    group_column: str = "source_repo"
    # training: a (group, class) cell with fewer training images is pooled, a group with fewer validation images is
    # not ranked by select: worst_group (too noisy)
    min_images: int = Field(20, ge=1, le=1_000_000)


class EvaluateParams(Section):
    batch_size: int = Field(128, ge=1, le=4096)
    gradcam_per_class: int = Field(3, ge=0, le=50)
    tta: list[str] = ["custom"]  # approaches scored with test-time augmentation


class ShortcutsParams(Section):
    """The shortcut audit: does each model read the lung fields, or the film around them?"""

    center_fraction: Number = Field(0.6, gt=0.0, lt=1.0)
    probe_epochs: int = Field(10, ge=1, le=10_000)
    cam_per_class: int = Field(50, ge=1, le=100_000)
    flag_share: Number = Field(0.5, gt=0.0, le=1.0)
    probe_margin: Number = Field(0.1, ge=0.0, le=1.0)


class CompareParams(Section):
    """Uncertainty and ensemble settings of the comparison."""

    bootstrap_resamples: int = Field(1000, ge=10, le=100_000)
    bootstrap_seed: Seed = 42
    alpha: Number = Field(0.05, gt=0.0, le=0.5)
    ensemble_weights: Literal["equal", "val_f1"] = "equal"
    temperature_scaling: bool = True
    ece_bins: int = Field(15, ge=2, le=100)


class Params(Section):
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
    groups: GroupsParams | None = None  # read by split, evaluate and compare

    @property
    def grouping(self) -> GroupsParams | None:
        """The groups CSV settings, or None when groups are off (``groups: null`` or ``groups.csv: null``)."""
        return None if self.groups is None or self.groups.csv is None else self.groups

    def approach(self, name: str) -> TrainParams:
        """The training recipe of one approach (``custom``, ``extract`` or ``finetune``)."""
        return getattr(self, REGISTRY[name].section)


def _check_weights(section: str, weights: str) -> None:
    if weights in ("imagenet", "none") or weights.endswith((".pt", ".pth")):
        return
    raise PipelineError(
        f"params.yaml: {section}.weights is {weights!r}; allowed: imagenet, none, or a path to a .pt/.pth state_dict"
    )


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a params mapping (as read from YAML) and return typed params."""
    params = validated(Params, raw)
    check_classes(params.data)
    if params.train_custom.weights != "none":
        raise PipelineError("params.yaml: train_custom.weights must be none (the custom CNN is trained from scratch)")
    for name in ("extract", "finetune"):
        _check_weights(f"train_{name}", params.approach(name).weights)
    unknown = [name for name in params.evaluate.tta if name not in APPROACHES]
    if unknown:
        raise PipelineError(f"params.yaml: evaluate.tta lists {unknown[0]!r}; allowed: {', '.join(APPROACHES)}")
    if params.split.unseen_groups and params.grouping is None:
        raise PipelineError("params.yaml: split.unseen_groups needs groups.csv set (the CSV that names each image's group)")
    _check_group_recipes(params)
    return params


def _check_group_recipes(params: Params) -> None:
    """A recipe that balances by group or selects by the worst group needs the groups CSV."""
    if params.grouping is not None:
        return
    for name in APPROACHES:
        recipe, section = params.approach(name), REGISTRY[name].section
        key = f"{section}.balance: group" if recipe.balance == "group" else f"{section}.select: worst_group"
        if recipe.uses_groups:
            raise PipelineError(f"params.yaml: {key} needs groups.csv set (the CSV that names each image's group)")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; every problem is a one-line :class:`PipelineError`."""
    return parse_params(read_params_file(path))


def as_dict(params: BaseModel) -> dict[str, Any]:
    """Plain-dict copy of (a section of) params, for checkpoints and logs."""
    return params.model_dump()
