"""Pictures: where the model looked for each word of a caption."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def attention_figure(image: Image.Image, words: Sequence[str], attention: Sequence[Sequence[float]],
                     path: str | Path, caption: str | None = None) -> None:
    """Save a grid of panels: the image, then one panel per word with its attention as a heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = int(round(math.sqrt(len(attention[0])))) if len(attention) else 7
    size = image.size
    panels = len(words) + 1
    cols = min(panels, 5)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title("input", fontsize=9)
    for ax, word, weights in zip(axes.flat[1:], words, attention):
        grid = np.asarray(weights, dtype=np.float32).reshape(side, side)
        grid = grid / (grid.max() or 1.0)
        heat = Image.fromarray((grid * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
        ax.imshow(image)
        ax.imshow(np.asarray(heat), cmap="jet", alpha=0.5)
        ax.set_title(word, fontsize=10)
    if caption:
        fig.suptitle(caption, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
