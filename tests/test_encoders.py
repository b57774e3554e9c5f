import urllib.error

import pytest
import torch

from aicrl.data.images import preprocess
from aicrl.model.encoders import EncoderWeightsError, build_encoder

from .conftest import SAMPLES


def test_packaged_lite2_weights_are_real_imagenet_weights(lite2):
    """The Lite2 classifier, run on real photos, names them: the weights are pretrained, not random."""
    net = lite2.trunk.net
    batch = torch.stack([preprocess(SAMPLES / "chelsea.jpg"), preprocess(SAMPLES / "coffee.jpg")])
    with torch.inference_mode():
        top5 = net(batch).topk(5).indices.tolist()
    assert set(top5[0]) & {281, 282, 283, 284, 285}, top5[0]  # tabby, tiger cat, Persian, Siamese, Egyptian
    assert set(top5[1]) & {967, 968, 504}, top5[1]  # espresso, cup, coffee mug


def test_lite2_grid_shape_and_frozen_by_default(lite2):
    with torch.inference_mode():
        grid = lite2(torch.zeros(2, 3, 224, 224))
    assert grid.shape == (2, 49, 1280)
    assert not any(p.requires_grad for p in lite2.parameters())


def test_last_stage_can_be_unfrozen():
    encoder = build_encoder("efficientnet-lite2")
    encoder.set_trainable(last_stage=True)
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and len(trainable) < len(list(encoder.parameters())) / 4
    last = f"_blocks.{len(encoder.trunk.net._blocks) - 1}."
    assert all((last in n or "_conv_head" in n or "_bn1" in n) for n in trainable), trainable[:5]
    encoder.train()
    assert not encoder.trunk.net._bn0.training  # frozen BatchNorm keeps its statistics


def test_resnet50_without_weights_fails_clearly_offline(monkeypatch):
    from torchvision.models import ResNet50_Weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(ResNet50_Weights.IMAGENET1K_V2), "get_state_dict", offline)
    with pytest.raises(EncoderWeightsError, match="--encoder-weights"):
        build_encoder("resnet50")
    with pytest.raises(EncoderWeightsError, match="not found"):
        build_encoder("resnet50", weights="/nonexistent/resnet50.pth")


def test_resnet50_loads_a_local_weights_file(tmp_path):
    from torchvision.models import resnet50

    state = resnet50(weights=None).state_dict()
    torch.save(state, tmp_path / "r50.pth")
    encoder = build_encoder("resnet50", weights=tmp_path / "r50.pth")
    with torch.inference_mode():
        assert encoder(torch.zeros(1, 3, 224, 224)).shape == (1, 49, 2048)
    loaded = dict(encoder.trunk.named_parameters())["0.weight"]  # conv1 of the cut network
    assert torch.equal(loaded, state["conv1.weight"])


def test_unknown_encoder_is_refused():
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("vgg16")
