"""Load one image the way the paper does: decode, fix orientation, RGB, 224x224, normalise.

Every failure to read an image becomes one typed error, `ImageLoadError`, so that callers (the
CLI, the feature extractor, the web server) can report it instead of crashing.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Refuse anything bigger than this many pixels before decoding it (decompression bombs).
MAX_PIXELS = 64_000_000

# File name endings taken as images when a folder is captioned or indexed.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})



def image_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The image files of a folder (by name ending), sorted; hidden files are left out."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in Path(folder).glob(pattern)
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


ImageSource = Union[str, os.PathLike, bytes, Image.Image]


class ImageLoadError(ValueError):
    """The input is not an image we can read (empty, not an image, truncated, or too large)."""


class ImageTooLargeError(ImageLoadError):
    """The image has more pixels than MAX_PIXELS (a decompression bomb, or simply too big)."""


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, bytes):
        if not source:
            raise ImageLoadError("empty file")
        return Image.open(io.BytesIO(source))
    path = Path(source)
    if not path.is_file():
        raise ImageLoadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{path}: empty file")
    return Image.open(path)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def _reduced(image: Image.Image, min_side: int) -> Image.Image:
    """`image` shrunk by the largest of 2, 4 or 8 that keeps both sides at least `min_side` (what the
    JPEG decoder's draft mode does), or as it is."""
    factor = 1
    while factor < 8 and min(image.size) // (factor * 2) >= min_side:
        factor *= 2
    return image.reduce(factor) if factor > 1 and image.mode in ("RGB", "RGBA", "RGBX", "L", "LA") else image


def decode_image(source: ImageSource, max_side: int | None = None) -> Image.Image:
    """Decode `source` (path, bytes or PIL image) into an upright 8-bit RGB PIL image.

    `max_side` lets the JPEG decoder work at a reduced size (fast for big photos); other formats are
    reduced the same way once decoded (by 2, 4 or 8, keeping both sides at least `max_side`), so a
    batch of big PNGs does not hold their full-size pixels. Raises
    ImageTooLargeError over MAX_PIXELS (before decoding) and ImageLoadError for anything unreadable.
    """
    where = f"{source}: " if isinstance(source, (str, os.PathLike)) else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(source)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageTooLargeError(
                    f"{where}{width}x{height} pixels is over the limit of {MAX_PIXELS:,}")
            if max_side:
                image.draft("RGB", (max_side, max_side))
            image.load()  # decode now, so a truncated file fails here and not later
            if max_side:
                image = _reduced(image, max_side)
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{where}too many pixels ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{where}not an image, or not a format we read (JPEG, PNG, GIF, WebP, "
                             "BMP, TIFF)") from e
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError...) for bad data
        raise ImageLoadError(f"{where}corrupt or truncated image ({e})") from e


def load_image(source: ImageSource, size: int = IMAGE_SIZE) -> Image.Image:
    """Decode `source` into an RGB `size` x `size` PIL image, as the encoders expect."""
    image = decode_image(source, max_side=size)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def to_array(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> (3, H, W) float32 array, scaled to [0, 1] and ImageNet-normalised."""
    array = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return (array - _MEAN) / _STD


def preprocess_array(source: ImageSource, size: int = IMAGE_SIZE) -> np.ndarray:
    """Path, bytes or PIL image -> normalised (3, size, size) float32 array (no torch needed)."""
    return to_array(load_image(source, size))


def to_tensor(image: Image.Image):
    """RGB PIL image -> (3, H, W) float torch tensor (the same numbers as `to_array`)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(to_array(image)))


def preprocess(source: ImageSource, size: int = IMAGE_SIZE):
    """Path, bytes or PIL image -> normalised (3, size, size) torch tensor ready for an encoder."""
    return to_tensor(load_image(source, size))
