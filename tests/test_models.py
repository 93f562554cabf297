"""Model construction, weight sources and checkpoints."""

import socket

import pytest
import torch
from torchvision.models import resnet18

from cxr.errors import PipelineError
from cxr.lung_box import center_box
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
