"""Tiny data the tests make themselves: coloured-shape photos with captions in the Flickr8k layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
SHAPES = ("square", "circle")


def _layout(seed: int) -> tuple[np.ndarray, int, int]:
    """A noisy light background and the top-left corner of a 120-pixel shape on it."""
    rng = np.random.default_rng(seed)
    background = rng.integers(200, 255, (224, 224, 3), dtype=np.uint8)
    x, y = rng.integers(20, 80, 2)
    return background, int(x), int(y)


def shape_image(colour: str, shape: str, seed: int) -> Image.Image:
    background, x, y = _layout(seed)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)((x, y, x + 120, y + 120), fill=COLOURS[colour])
    return image


def shape_side(seed: int) -> str:
    """The half of `shape_image(..., seed)` that holds the shape's centre."""
    return "left" if _layout(seed)[1] + 60 < 112 else "right"


def write_flickr8k(root: Path, images_per_kind: int = 2, styles: bool = False) -> Path:
    """A folder shaped like Flickr8k: images/, Flickr8k.token.txt, split files (+ a styles jsonl)."""
    (root / "images").mkdir(parents=True)
    names, tokens, style_lines = [], [], []
    n = 0
    for colour in COLOURS:
        for shape in SHAPES:
            for k in range(images_per_kind):
                name = f"{1000 + n}_{colour}{shape}{k}.jpg"
                shape_image(colour, shape, n).save(root / "images" / name, quality=92)
                names.append(name)
                captions = [f"a {colour} {shape} on a white background", f"a {colour} {shape}",
                            f"the {shape} is {colour}", f"one {colour} {shape} on the {shape_side(n)}",
                            f"a picture of a {colour} {shape}"]
                tokens += [f"{name}#{i}\t{c} ." for i, c in enumerate(captions)]
                style_lines += [{"image": name, "style": "humorous", "caption": f"a {colour} {shape} telling jokes"},
                                {"image": name, "style": "romantic", "caption": f"a {colour} {shape} in love"}]
                n += 1
    tokens.append("2258277193_586949ec62.jpg.1#0\tbogus line from the real dataset")
    (root / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    train, dev, test = names[0::3] + names[1::3], names[2::3][:2], names[2::3][2:]
    for split, part in (("train", train), ("dev", dev), ("test", test)):
        name = {"train": "trainImages", "dev": "devImages", "test": "testImages"}[split]
        (root / f"Flickr_8k.{name}.txt").write_text("\n".join(part) + "\n")
    if styles:
        split_of = {n: s for s, part in (("train", train), ("dev", dev)) for n in part}
        with open(root / "styles.jsonl", "w") as f:
            for line in style_lines:
                if line["image"] in split_of:
                    f.write(json.dumps(line | {"split": split_of[line["image"]]}) + "\n")
    return root
