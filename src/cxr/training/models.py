"""The three approaches' networks, built so every model takes the same input.

Every model starts with :class:`InputNorm`, which owns the normalisation statistics and
turns the pipeline's 1-channel [0, 1] images into what the body expects (3 ImageNet-
normalised channels for a pretrained ResNet). The statistics therefore travel inside the
checkpoint, and evaluation, Grad-CAM and ``cxr-predict`` cannot get them wrong.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import ResNet18_Weights, resnet18

from cxr.errors import PipelineError, first_line
from cxr.lung_box import center_box
from cxr.params import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("custom_cnn", "resnet18")
StateDictLoader = Callable[[], dict[str, torch.Tensor]]
_PLAIN = (bool, int, float, str, type(None))
CHECKPOINT_KEYS = ("model", "model_args", "classes", "image_size", "approach")  # what the consumers read


def bilinear_weights(side: int, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The (size, side) matrix that resizes a length-``side`` line to ``size`` points, bilinearly.

    Taken from ``F.interpolate`` (half-pixel centres, ``align_corners=False``) applied to the
    identity, so ``R @ box @ R.T`` is exactly its bilinear resize, yet made of matrix products:
    their backward pass (Grad-CAM's) is deterministic on a GPU, the resize kernel's is not.
    """
    eye = torch.eye(side, device=device, dtype=torch.float32).view(1, 1, side, side)
    return F.interpolate(eye, size=(size, side), mode="bilinear", align_corners=False)[0, 0].to(dtype)


class InputNorm(nn.Module):
    """Normalise 1-channel [0, 1] input and repeat it to the body's channel count.

    With ``lung_box`` set the model sees only the centred box of that share of the side,
    in training, evaluation, Grad-CAM and ``cxr-predict`` alike: ``border: hide`` turns
    everything outside it into 0 (the normalised mean grey); ``border: crop`` (``crop``)
    resizes the box bilinearly to the input's size, so the lungs get the pixels hiding
    spends on grey. The box is always smaller than the input, so the resize only enlarges.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], lung_box: float = 0.0, crop: bool = False) -> None:
        super().__init__()
        if crop and not lung_box:
            raise ValueError("crop needs a lung_box to crop to")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.lung_box = lung_box
        self.crop = crop

    @property
    def border(self) -> str:
        """The ``train_*.border`` option this module applies: keep, hide or crop."""
        return "crop" if self.crop else "hide" if self.lung_box else "keep"

    def cropped(self, x: torch.Tensor) -> torch.Tensor:
        """The centred ``lung_box`` of ``x`` (N, C, S, S) resized bilinearly back to S x S."""
        rows, cols = center_box(x.shape[-1], self.lung_box)
        weights = bilinear_weights(rows.stop - rows.start, x.shape[-1], x.device, x.dtype)
        return weights @ x[..., rows, cols] @ weights.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop:
            x = self.cropped(x)
        normed = (x.expand(-1, self.mean.shape[1], -1, -1) - self.mean) / self.std
        if self.border != "hide":
            return normed
        rows, cols = center_box(x.shape[-1], self.lung_box)
        hidden = torch.zeros_like(normed)
        hidden[..., rows, cols] = normed[..., rows, cols]
        return hidden


class Classifier(nn.Module):
    """``norm`` → ``body`` (pooled embedding) → ``head``; ``embed`` lets a frozen body be cached."""

    def __init__(self, norm: InputNorm, body: nn.Module, head: nn.Module, cam_layer: str) -> None:
        super().__init__()
        self.norm, self.body, self.head = norm, body, head
        self.cam_layer = cam_layer
        self.body_frozen = False

    def freeze_body(self) -> None:
        """Train only the head: body weights fixed and BatchNorm statistics kept (eval mode)."""
        self.body.requires_grad_(False)
        self.body_frozen = True
        self.body.eval()

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.body_frozen:
            self.body.eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def target_layer(self) -> nn.Module:
        """The last convolutional block, where Grad-CAM looks."""
        return self.get_submodule(self.cam_layer)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut: depth without vanishing gradients."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(channels, channels)
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.conv1(x)))


def custom_cnn_body(width: int) -> nn.Sequential:
    """A compact residual CNN that downsamples early.

    A stride-2 stem halves the resolution before any wide layer, then four stages each
    halve it again (strided conv + one residual block), doubling channels, for the mostly
    global patterns (opacities, consolidation) that separate these classes. At width 48 (the
    default) it costs 0.95 GMAC per 224 px image and has 4.4 M parameters, against ResNet-18's
    1.81 GMAC and 11.2 M; at width 32, 0.42 GMAC and 2.0 M.
    """
    layers: list[nn.Module] = [_conv_bn(1, width, stride=2), _conv_bn(width, width)]
    channels = width
    for multiplier in (1, 2, 4, 8):
        out = width * multiplier
        layers += [nn.Sequential(_conv_bn(channels, out, stride=2), ResidualBlock(out))]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _resnet18_body(state_dict: dict[str, torch.Tensor] | None) -> nn.Module:
    body = resnet18(weights=None)
    if state_dict is not None:
        backbone = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = body.load_state_dict(backbone, strict=False)
        except RuntimeError as err:
            raise PipelineError(f"weights do not fit ResNet-18: {str(err).splitlines()[-1].strip()}") from None
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise PipelineError(
                f"weights do not fit ResNet-18: {len(missing)} missing keys (e.g. {missing[:1]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})"
            )
    body.fc = nn.Identity()
    return body


def build_model(
    arch: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: int = 32,
    dropout: float = 0.0,
    backbone_state: dict[str, torch.Tensor] | None = None,
    lung_box: float = 0.0,
    crop: bool = False,
) -> Classifier:
    """Build a classifier; ``backbone_state`` (ResNet only) initialises the body.

    ``lung_box`` > 0 hides the border around the centred box, or with ``crop`` crops to that box
    (see :class:`InputNorm`); checkpoints from before ``crop`` existed lack it and rebuild as before.
    """
    if arch == "custom_cnn":
        body, features, cam_layer = custom_cnn_body(width), width * 8, "body.5"
    elif arch == "resnet18":
        body, features, cam_layer = _resnet18_body(backbone_state), 512, "body.layer4"
    else:
        raise PipelineError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHS)}")
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))
    return Classifier(InputNorm(mean, std, lung_box, crop), body, head, cam_layer)


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's ``ResNet18_Weights.IMAGENET1K_V1`` (downloaded once to ``$TORCH_HOME``)."""
    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    except (OSError, urllib.error.URLError, RuntimeError) as err:
        raise PipelineError(
            f"cannot load ImageNet weights for ResNet-18 ({type(err).__name__}: {err}); connect to the internet once, "
            "or copy resnet18-f37072fd.pth into $TORCH_HOME/hub/checkpoints/, or set train_<approach>.weights "
            "to a local .pth file or to none (trains from random initialisation)"
        ) from None


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A ResNet-18 state_dict from a local file (a bare state_dict or a checkpoint with ``model``)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"weights file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; all mean "not a weights file"
        raise PipelineError(f"{path} is not a loadable PyTorch state_dict: {str(err).splitlines()[0]}") from None
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{path} does not hold a state_dict of tensors")
    return {k.removeprefix("body."): v for k, v in state.items()}


def backbone_weights(weights: str, imagenet: StateDictLoader = imagenet_state_dict) -> dict[str, torch.Tensor] | None:
    """Resolve the ``weights`` param: ``imagenet``, ``none`` or a path to a state_dict."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return imagenet()
    return load_state_dict_file(Path(weights))


def _describe(value: Any) -> str:
    """A value as an error message shows it: short plain values as written, anything else by its type."""
    items, text = value if isinstance(value, (list, tuple)) else [value], repr(value)
    return text if all(isinstance(item, _PLAIN) for item in items) and len(text) <= 40 else type(value).__name__


def _checkpoint_problem(checkpoint: dict[str, Any]) -> str | None:
    """What is wrong with a loaded checkpoint's keys, naming the first bad key; ``None`` when it is usable."""
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        return f"is not a checkpoint written by this pipeline (no {missing[0]!r} key)"
    model, args, classes, size = (checkpoint[key] for key in ("model", "model_args", "classes", "image_size"))
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        return f"checkpoint key 'model' must be a state_dict of named tensors, got {_describe(model)}"
    if not isinstance(args, dict) or not all(isinstance(key, str) for key in args):
        return f"checkpoint key 'model_args' must be a mapping of build_model arguments, got {_describe(args)}"
    if not isinstance(classes, list) or not classes or not all(isinstance(name, str) for name in classes):
        return f"checkpoint key 'classes' must be a non-empty list of class names, got {_describe(classes)}"
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        return (f"checkpoint key 'image_size' must be a whole number of pixels from {MIN_IMAGE_SIZE} to "
                f"{MAX_IMAGE_SIZE}, got {_describe(size)}")
    if not isinstance(checkpoint["approach"], str):
        return f"checkpoint key 'approach' must be a string, got {_describe(checkpoint['approach'])}"
    return None


def _state_mismatch(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str | None:
    """The first parameter where saved weights and the built model differ (with shapes), and how many differ."""
    problems = [
        f"{key} missing from the checkpoint (model {list(tensor.shape)})" if key not in saved
        else f"{key}: checkpoint {list(saved[key].shape)}, model {list(tensor.shape)}"
        for key, tensor in expected.items() if key not in saved or saved[key].shape != tensor.shape
    ] + [f"{key} is in the checkpoint but not in the model" for key in saved if key not in expected]
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def model_from_checkpoint(checkpoint: dict[str, Any], source: str = "checkpoint") -> Classifier:
    """Rebuild a trained model from a checkpoint validated by :func:`load_checkpoint`.

    A mismatch names the first differing parameter and both shapes, so a user can tell a
    wrong ``model_args`` (width, architecture) from a file of another model.
    """
    try:
        model = build_model(**checkpoint["model_args"])
    except (PipelineError, TypeError, ValueError, RuntimeError) as err:
        raise PipelineError(f"{source}: checkpoint key 'model_args' does not describe a model ({first_line(err)})") from None
    mismatch = _state_mismatch(model.state_dict(), checkpoint["model"])
    if mismatch:
        raise PipelineError(f"{source}: the weights do not match the model its model_args describe: {mismatch}")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        raise PipelineError(f"{source}: the weights do not match the model its model_args describe ({first_line(err)})") from None
    return model.eval()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and validate a checkpoint written by the training stage: the one place its keys are checked.

    Every consumer (evaluate, shortcuts, external, ``cxr-predict``) reads ``model``,
    ``model_args``, ``classes``, ``image_size`` and ``approach`` from what this returns, so a
    hand-made or truncated file stops here with one line naming the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"model file not found: {path}")
    if path.stat().st_size == 0:
        raise PipelineError(f"{path} is not a model checkpoint: the file is empty")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure here means the file is not a checkpoint of ours
        raise PipelineError(f"{path} is not a model checkpoint: {first_line(err)}") from None
    if not isinstance(checkpoint, dict):
        raise PipelineError(f"{path} is not a checkpoint written by this pipeline (it holds a {type(checkpoint).__name__})")
    problem = _checkpoint_problem(checkpoint)
    if problem:
        raise PipelineError(f"{path} {problem}" if problem.startswith("is not") else f"{path}: {problem}")
    return checkpoint
