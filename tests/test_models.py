"""Model construction, weight sources and checkpoints."""

import socket

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.models import resnet18

from cxr.errors import PipelineError
from cxr.evaluation.inference import load_trained_model
from cxr.lung_box import center_box
from cxr.params import TrainParams
from cxr.predict import load_model
from cxr.training.loop import model_args_for
from cxr.training.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    backbone_weights,
    build_model,
    imagenet_state_dict,
    load_checkpoint,
    model_from_checkpoint,
)


def test_custom_cnn_takes_one_channel_and_predicts_three_classes():
    model = build_model("custom_cnn", 3, [0.5], [0.2], width=8).eval()
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 3)


def test_grayscale_reaches_pretrained_resnet_as_three_imagenet_normalised_channels():
    model = build_model("resnet18", 3, IMAGENET_MEAN, IMAGENET_STD)
    x = torch.full((1, 1, 4, 4), 0.5)
    normed = model.norm(x)
    assert normed.shape == (1, 3, 4, 4)
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(normed[0, :, 0, 0], expected)


def test_local_state_dict_initialises_the_backbone(tmp_path):
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 3, IMAGENET_MEAN, IMAGENET_STD, backbone_state=backbone_weights(str(path)))
    assert torch.equal(model.body.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.body.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.head[-1].out_features == 3


def test_weights_none_means_no_pretrained_state():
    assert backbone_weights("none") is None


def test_imagenet_loader_is_used_for_imagenet_weights():
    calls = []
    state = resnet18(weights=None).state_dict()
    assert backbone_weights("imagenet", imagenet=lambda: calls.append(1) or state) is state
    assert calls == [1]


def test_missing_or_wrong_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="weights file not found"):
        backbone_weights(str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(PipelineError, match="not a loadable PyTorch state_dict"):
        backbone_weights(str(garbage))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    with pytest.raises(PipelineError, match="do not fit ResNet-18"):
        build_model("resnet18", 3, IMAGENET_MEAN, IMAGENET_STD, backbone_state=backbone_weights(str(wrong)))


def test_offline_imagenet_weights_stop_with_the_param_to_change(tmp_path, monkeypatch, own_network_log):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(PipelineError) as excinfo:
        imagenet_state_dict()
    message = str(excinfo.value)
    assert "\n" not in message
    assert "ImageNet weights" in message and ".weights" in message and "none" in message
    assert "download.pytorch.org" in own_network_log.read_text()  # the real download was tried, and refused


def test_frozen_body_stays_in_eval_mode_while_training_the_head():
    model = build_model("resnet18", 3, IMAGENET_MEAN, IMAGENET_STD)
    model.freeze_body()
    model.train()
    assert not model.body.training and model.head.training
    assert all(not p.requires_grad for p in model.body.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    args = {"arch": "custom_cnn", "num_classes": 3, "mean": [0.4], "std": [0.2], "width": 8, "dropout": 0.1}
    model = build_model(**args).eval()
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "model_args": args, "approach": "custom", "classes": ["A"],
                "image_size": 32}, path)
    restored = model_from_checkpoint(load_checkpoint(path))
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(model(x), restored(x))


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(PipelineError, match="not a checkpoint written by this pipeline"):
        load_checkpoint(path)
    with pytest.raises(PipelineError, match="model file not found"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("arch, mean, std", [("custom_cnn", [0.4], [0.2]), ("resnet18", IMAGENET_MEAN, IMAGENET_STD)])
def test_a_lung_box_model_cannot_see_the_border(arch, mean, std):
    model = build_model(arch, 3, mean, std, width=8, lung_box=0.5).eval()
    x = torch.rand(2, 1, 32, 32)
    rows, cols = center_box(32, 0.5)
    other_border = torch.rand(2, 1, 32, 32)
    other_border[..., rows, cols] = x[..., rows, cols]
    assert torch.equal(model(x), model(other_border))
    hidden = model.norm(x)
    assert torch.count_nonzero(hidden) == hidden.shape[1] * 2 * 16 * 16  # only the 16 x 16 box is left
    assert torch.equal(hidden[..., rows, cols], build_model(arch, 3, mean, std, width=8).norm(x)[..., rows, cols])


def test_the_lung_box_travels_in_the_checkpoint(tmp_path):
    args = {"arch": "custom_cnn", "num_classes": 3, "mean": [0.4], "std": [0.2], "width": 8, "dropout": 0.1,
            "lung_box": 0.5}
    model = build_model(**args).eval()
    torch.save({"model": model.state_dict(), "model_args": args, "approach": "custom", "classes": ["A"],
                "image_size": 32}, tmp_path / "model.pt")
    restored = model_from_checkpoint(load_checkpoint(tmp_path / "model.pt"))
    assert restored.norm.lung_box == 0.5
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(model(x), restored(x))


def pil_bilinear_crop(x: torch.Tensor, lung_box: float) -> torch.Tensor:
    """The centred box of each (1, S, S) image, sliced by hand and enlarged to S x S by PIL's bilinear filter."""
    size = x.shape[-1]
    side = round(size * lung_box)
    start = (size - side) // 2
    resized = [
        np.asarray(Image.fromarray(image[0, start:start + side, start:start + side].numpy(), mode="F")
                   .resize((size, size), Image.Resampling.BILINEAR))
        for image in x
    ]
    return torch.from_numpy(np.stack(resized)).unsqueeze(1)


@pytest.mark.parametrize("size", [32, 45])
@pytest.mark.parametrize("lung_box", [0.5, 0.7])
@pytest.mark.parametrize("arch, mean, std", [("custom_cnn", [0.4], [0.2]), ("resnet18", IMAGENET_MEAN, IMAGENET_STD)])
def test_a_crop_model_feeds_its_body_the_bilinear_enlargement_of_the_centred_box(size, lung_box, arch, mean, std):
    model = build_model(arch, 3, mean, std, width=8, lung_box=lung_box, crop=True).eval()
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(size))
    expected = (pil_bilinear_crop(x, lung_box) - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    assert model.norm.border == "crop"
    torch.testing.assert_close(model.norm(x), expected, rtol=0, atol=1e-5)
    rows, cols = center_box(size, lung_box)
    resized = F.interpolate(x[..., rows, cols], size=(size, size), mode="bilinear", align_corners=False)
    keep = build_model(arch, 3, mean, std, width=8).norm
    torch.testing.assert_close(model.norm(x), keep(resized), rtol=0, atol=1e-6)
    other_border = torch.rand(2, 1, size, size)
    other_border[..., rows, cols] = x[..., rows, cols]
    assert torch.equal(model(x), model(other_border))


def test_crop_needs_a_box():
    with pytest.raises(ValueError, match="crop needs a lung_box"):
        build_model("custom_cnn", 3, [0.4], [0.2], width=8, crop=True)


@pytest.mark.parametrize("border, lung_box", [("keep", 0.0), ("hide", 0.5), ("crop", 0.5)])
def test_a_border_recipe_travels_in_the_checkpoint_to_predict_and_evaluate(border, lung_box, tmp_path):
    images = torch.randint(0, 256, (4, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    args = model_args_for("custom", TrainParams(border=border, lung_box=0.5, width=8), images, 3)
    assert (args["lung_box"], args["crop"]) == (lung_box, border == "crop")
    model = build_model(**args).eval()
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "model_args": args, "approach": "custom", "classes": ["A", "B", "C"],
                "image_size": 32}, path)
    predicted, _ = load_model(path, torch.device("cpu"))
    evaluated, _ = load_trained_model(path, ["A", "B", "C"], torch.device("cpu"))
    x = torch.rand(2, 1, 32, 32)
    for restored in (predicted, evaluated):
        assert restored.norm.border == border and restored.norm.lung_box == lung_box
        torch.testing.assert_close(restored.norm(x), model.norm(x), rtol=0, atol=0)
        torch.testing.assert_close(restored(x), model(x))
