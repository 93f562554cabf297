"""Grad-CAM heatmaps and the examples a gallery shows: where a model looks when right and when wrong.

Heatmaps come from ``pytorch_grad_cam`` on :meth:`Classifier.target_layer`. The model is
borrowed, not changed: its train/eval modes, ``requires_grad`` flags and ``.grad`` tensors
are put back afterwards, so Grad-CAM can run between training and evaluation safely.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torch.nn import functional as F

from cxr.errors import PipelineError
from cxr.evaluation.predictions import PROB_PREFIX
from cxr.lung_box import center_box
from cxr.training.models import Classifier

OUTCOMES = ("correct", "wrong")
MISCLASSIFIED_COLUMNS = ["path", "label", "predicted", "confidence"]


@contextmanager
def _borrowed_for_saliency(model: nn.Module) -> Iterator[None]:
    """Eval mode with every parameter frozen, then restore modes, flags and gradients exactly.

    Freezing all parameters keeps Grad-CAM's backward pass from touching weight gradients;
    the gradient it needs flows to the activations because the input requires grad. The
    library's ``zero_grad`` would still wipe existing ``.grad`` tensors, so they are saved.
    """
    modes = {module: module.training for module in model.modules()}
    params = list(model.parameters())
    flags = [param.requires_grad for param in params]
    grads = [param.grad for param in params]
    try:
        model.eval()
        for param in params:
            param.requires_grad_(False)
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        for param, flag, grad in zip(params, flags, grads):
            param.requires_grad_(flag)
            param.grad = grad


def _num_outputs(model: Classifier) -> int:
    linears = [module for module in model.head.modules() if isinstance(module, nn.Linear)]
    return linears[-1].out_features


def _check_targets(target_classes: Sequence[int] | None, count: int, num_outputs: int) -> list[int] | None:
    """Validate up front: ``pytorch_grad_cam`` swallows an IndexError raised inside its context."""
    if target_classes is None:
        return None
    targets = [int(target) for target in target_classes]
    if len(targets) != count:
        raise ValueError(f"target_classes has {len(targets)} entries for {count} images")
    bad = [target for target in targets if not 0 <= target < num_outputs]
    if bad:
        raise ValueError(f"target classes {bad[:5]} outside 0..{num_outputs - 1}")
    return targets


def gradcam_heatmaps(
    model: Classifier,
    images: torch.Tensor,
    target_classes: Sequence[int] | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Grad-CAM of ``images`` (N, 1, H, W) in [0, 1] as float32 (N, H, W) maps in [0, 1].

    ``target_classes`` (one per image) picks the class explained; None explains the
    predicted class. Runs on the model's device; works for a frozen body too. A model that
    crops to its lung box gets its maps placed on that box of the image (:func:`onto_film`).
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W), got {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    count, height, width = images.shape[0], images.shape[2], images.shape[3]
    targets = _check_targets(target_classes, count, _num_outputs(model))
    heatmaps = np.zeros((count, height, width), dtype=np.float32)
    if count == 0:
        return heatmaps
    device = next(model.parameters()).device
    completed = False
    with _borrowed_for_saliency(model), torch.enable_grad():
        with GradCAM(model=model, target_layers=[model.target_layer()]) as cam:
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                batch = images[start:stop].to(device=device, dtype=torch.float32, copy=True).requires_grad_(True)
                batch_targets = None if targets is None else [ClassifierOutputTarget(t) for t in targets[start:stop]]
                heatmaps[start:stop] = cam(input_tensor=batch, targets=batch_targets)
            completed = True
    if not completed:
        raise RuntimeError("Grad-CAM stopped early: pytorch_grad_cam swallowed an IndexError (its message is on stdout)")
    heatmaps = np.clip(np.nan_to_num(heatmaps, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return onto_film(heatmaps, model.norm.lung_box) if model.norm.crop else heatmaps


def onto_film(heatmaps: np.ndarray, lung_box: float) -> np.ndarray:
    """Maps (N, S, S) of a model that crops to ``lung_box`` placed on the box of the film it was shown.

    ``pytorch_grad_cam`` scales a map to the model's input, which for a cropping model is the
    box enlarged to the whole image; stretched over the film, the map would point at the border.
    It is shrunk back to the box (bilinear, antialiased) and the film around it gets 0: the
    model never saw it.
    """
    rows, cols = center_box(heatmaps.shape[-1], lung_box)
    side = rows.stop - rows.start
    shrunk = F.interpolate(torch.from_numpy(heatmaps).unsqueeze(1), size=(side, side), mode="bilinear",
                           align_corners=False, antialias=True)
    placed = np.zeros_like(heatmaps)
    placed[:, rows, cols] = shrunk[:, 0].clamp_(0.0, 1.0).numpy()
    return placed


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """A uint8 grayscale (H, W) image with a jet-coloured heatmap on top, as uint8 RGB (H, W, 3).

    ``alpha`` is the heatmap's weight; the image keeps ``1 - alpha``.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"image must be uint8 (H, W), got {image.dtype} {image.shape}")
    if heatmap.shape != image.shape:
        raise ValueError(f"heatmap shape {heatmap.shape} differs from image shape {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = np.repeat(image[:, :, None].astype(np.float32) / 255.0, 3, axis=2)
    mask = np.clip(np.nan_to_num(heatmap.astype(np.float32), nan=0.0), 0.0, 1.0)
    return show_cam_on_image(rgb, mask, use_rgb=True, image_weight=1.0 - alpha)


def _with_confidence(frame: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Add ``confidence``, the probability the model gave its own prediction."""
    needed = ["path", "label", "predicted", *(f"{PROB_PREFIX}{name}" for name in classes)]
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        raise PipelineError(f"predictions table lacks columns {missing}")
    unknown = sorted(set(frame["predicted"]) - set(classes))
    if unknown:
        raise PipelineError(f"predictions table has predicted classes {unknown} not in {list(classes)}")
    probabilities = frame[[f"{PROB_PREFIX}{name}" for name in classes]].to_numpy(np.float64)
    column = frame["predicted"].map({name: index for index, name in enumerate(classes)}).to_numpy(int)
    return frame.assign(confidence=probabilities[np.arange(len(frame)), column])


def _most_confident_first(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["confidence", "path"], ascending=[False, True], kind="mergesort")


def select_examples(frame: pd.DataFrame, classes: Sequence[str], per_class: int) -> pd.DataFrame:
    """Up to ``per_class`` correct and ``per_class`` wrong predictions per true class, for the gallery.

    Rows come in class order, correct before wrong, most confident first (ties by path), so
    the same table always gives the same gallery. Adds ``confidence`` and ``outcome``; keeps
    the original index, which locates each row's image.
    """
    if per_class < 0:
        raise ValueError(f"per_class must be non-negative, got {per_class}")
    scored = _with_confidence(frame, classes)
    scored["outcome"] = np.where(scored["label"] == scored["predicted"], "correct", "wrong")
    parts = [
        _most_confident_first(scored[(scored["label"] == name) & (scored["outcome"] == outcome)]).head(per_class)
        for name in classes
        for outcome in OUTCOMES
    ]
    return pd.concat([scored.iloc[:0], *parts])


def misclassified(frame: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Every wrong prediction with the model's confidence in it, most confident mistakes first."""
    scored = _with_confidence(frame, classes)
    wrong = scored[scored["label"] != scored["predicted"]]
    return _most_confident_first(wrong)[MISCLASSIFIED_COLUMNS].reset_index(drop=True)
