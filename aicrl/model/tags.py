"""Tags: the ImageNet labels of a photo, from the encoder's own 1,000-class head.

EfficientNet-Lite2 ships with its ImageNet classifier (global average pooling + one linear layer on
the last-stage features). The caption decoder attends over those same features, so the labels cost
one 1280x1000 matrix product on the grid the captioner already computed: no second encoder pass.
They name things the captioning vocabulary may not know ("espresso", "laptop", "lynx").

ImageNet's class names come from torchvision (a dependency), which ships them offline.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

TOP_K = 5
MIN_PROBABILITY = 0.05  # below this a label is mostly noise


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in the classifier's output order."""
    from torchvision.models import EfficientNet_B0_Weights

    return tuple(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


def classifier_head(encoder: nn.Module) -> nn.Linear | None:
    """The encoder's ImageNet linear layer, or None where it has none (resnet50's trunk drops it)."""
    net = getattr(getattr(encoder, "trunk", None), "net", None)
    head = getattr(net, "_fc", None)
    return head if isinstance(head, nn.Linear) and head.out_features == len(imagenet_classes()) else None


@torch.inference_mode()
def tags_from_features(head: nn.Linear, features: torch.Tensor, top_k: int = TOP_K,
                       min_probability: float = MIN_PROBABILITY) -> list[list[dict]]:
    """(B, regions, dim) grids -> per image, up to `top_k` {"label", "probability"} above the
    threshold, most likely first."""
    probs = head(features.float().mean(1)).softmax(-1)
    values, indices = probs.topk(top_k, dim=-1)
    names = imagenet_classes()
    return [[{"label": names[i], "probability": round(float(p), 4)}
             for p, i in zip(row_p.tolist(), row_i.tolist()) if p >= min_probability]
            for row_p, row_i in zip(values, indices)]
