"""Is there a person in the photo? Two small detectors that see people, on ONNX Runtime.

ImageNet has no person class. The person probe (concepts.PersonHead) reads people off the ImageNet
classes (jerseys, skis, grooms), learnt on Flickr8k, and on everyday photos of sinks and parking
meters it still sees people in half of them: the decoder then writes one in. These two detectors
from Google's MediaPipe (Apache-2.0) look for people themselves: BlazePose's person detector (224 px,
people near and far, by face and body) and the full-range face detector (192 px, faces up to about
5 m). Each reports the score of its most confident anchor; PersonHead mixes both with the probe
(`aicrl fit-people`). people.onnx holds the two graphs as one (build_people.py converts them from
the MediaPipe wheel). Numpy, Pillow and ONNX Runtime only: it runs in the torch-free base install.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .folder import ModelFolder

INPUTS = {"pose": 224, "face": 192}  # each detector's input: a square letterboxed photo, this many px
DETECTORS = tuple(INPUTS)  # the order of the scores PeopleDetector gives


def letterbox(image: Image.Image, size: int) -> np.ndarray:
    """RGB photo -> (1, size, size, 3) float32 in [-1, 1], the whole photo scaled into the square
    and centred on black (MediaPipe's preprocessing: no part of a person is cropped away)."""
    scale = size / max(image.size)
    resized = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                          Image.Resampling.BILINEAR)
    square = Image.new("RGB", (size, size))
    square.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return (np.asarray(square, dtype=np.float32) / np.float32(127.5) - 1)[None]


class PeopleDetector:
    """people.onnx: photos -> (B, 2) scores in [0, 1] of the pose and face detectors (DETECTORS)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path, self.threads = Path(path), threads
        self._session = None

    @classmethod
    def load(cls, model_dir: str | Path, threads: int | None = None) -> "PeopleDetector | None":
        """The folder's detectors, or None when it has none (an older model)."""
        path = ModelFolder(model_dir).people
        return cls(path, threads) if path.is_file() else None

    @property
    def session(self):
        if self._session is None:
            from ..runtime import _session

            self._session = _session(self.path, threads=self.threads)
        return self._session

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, 2) detector scores of decoded RGB photos (data.images.decode_image)."""
        out = np.zeros((len(images), len(DETECTORS)), dtype=np.float32)
        for i, image in enumerate(images):  # the graphs take one photo at a time
            feed = {f"{name}_image": letterbox(image, size) for name, size in INPUTS.items()}
            out[i] = self.session.run(list(DETECTORS), feed)
        return out
