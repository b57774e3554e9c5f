"""Tags: the ImageNet labels of a photo, from the encoder's own 1,000-class head.

EfficientNet-Lite2 ships with its ImageNet classifier (global average pooling + one linear layer on
the last-stage features). The caption decoder attends over those same features, so the labels cost
one 1280x1000 matrix product on the grid the captioner already computed: no second encoder pass.
They name things the captioning vocabulary may not know ("espresso", "laptop", "lynx").

Runs on numpy, for both backends: the torch encoder gives its head's weights (`head_weights`), and
`aicrl export` writes the same weights to the model folder (classifier.npz) for ONNX Runtime.
The class names ship beside this file (from torchvision's ImageNet metadata).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from .concepts import imagenet_probabilities
from .folder import ModelFolder

TOP_K = 5
MIN_PROBABILITY = 0.05  # below this a label is mostly noise


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in the classifier's output order."""
    return tuple((Path(__file__).parent / "imagenet_classes.txt").read_text().splitlines())


def head_weights(encoder) -> tuple[np.ndarray, np.ndarray] | None:
    """(weight, bias) of the torch encoder's ImageNet linear layer, or None where it has none
    (resnet50's trunk drops it)."""
    from torch import nn

    net = getattr(getattr(encoder, "trunk", None), "net", None)
    head = getattr(net, "_fc", None)
    if not (isinstance(head, nn.Linear) and head.out_features == len(imagenet_classes())):
        return None
    return head.weight.detach().float().cpu().numpy(), head.bias.detach().float().cpu().numpy()


def save_head(encoder, model_dir: Path) -> bool:
    """Write the encoder's head to `model_dir` (fp16: weight (1000, dim), bias (1000,)) for the ONNX
    backend; False where it has none."""
    head = head_weights(encoder)
    if head is not None:
        np.savez(ModelFolder(model_dir).classifier, weight=head[0].astype(np.float16), bias=head[1].astype(np.float16))
    return head is not None


def load_head(model_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    path = ModelFolder(model_dir).classifier
    if not path.is_file():
        return None
    with np.load(path) as f:
        return f["weight"].astype(np.float32), f["bias"].astype(np.float32)


def tags_from_features(head: tuple[np.ndarray, np.ndarray], features: np.ndarray, top_k: int = TOP_K,
                       min_probability: float = MIN_PROBABILITY) -> list[list[dict]]:
    """(B, regions, dim) grids -> per image, up to `top_k` {"label", "probability"} above the
    threshold, most likely first."""
    probs = imagenet_probabilities(head, features)
    names = imagenet_classes()
    out = []
    for row in probs:
        best = np.argsort(-row, kind="stable")[:top_k]
        out.append([{"label": names[i], "probability": round(float(row[i]), 4)} for i in best
                    if row[i] >= min_probability])
    return out
