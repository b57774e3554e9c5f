"""Readers for Flickr8k, COCO 2017 captions and style-labelled jsonl -> one `CaptionData` shape.

Each reader returns the image folder plus a flat list of `Record(image, caption, split, style)`,
so training and evaluation never care which dataset they came from.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FACTUAL = "factual"
ALL = "all"  # the split name that selects every image (a small sample like coco_mini)
DATASETS = ("flickr8k", "coco")
# What a model card says a model trained on each dataset learnt from (see serving/card.py).
DATASET_DESCRIPTIONS = {
    "flickr8k": "Flickr8k (8,000 everyday photos, mostly people and dogs outdoors, 5 captions each)",
    "coco": "MS COCO 2017 (118,000 photos of 80 kinds of everyday objects in context, 5 captions each)",
}


@dataclass(frozen=True)
class Record:
    image: str  # file name relative to CaptionData.image_dir
    caption: str
    split: str  # train / dev / test (images in no split get "none")
    style: str = FACTUAL


@dataclass
class CaptionData:
    image_dir: Path
    records: list[Record] = field(default_factory=list)

    def images(self, split: str | None = None) -> list[str]:
        """Distinct image names (of one split, or all), in first-seen order."""
        seen = dict.fromkeys(r.image for r in self.records if split is None or r.split == split)
        return list(seen)

    def references(self, split: str, style: str = FACTUAL) -> dict[str, list[str]]:
        """image -> its captions of one style (of one split, or of every image for ALL), for evaluation."""
        refs: dict[str, list[str]] = defaultdict(list)
        for r in self.records:
            if split in (r.split, ALL) and r.style == style:
                refs[r.image].append(r.caption)
        return dict(refs)

    def select(self, split: str, styles: set[str] | None = None) -> list[Record]:
        return [r for r in self.records if r.split == split and (styles is None or r.style in styles)]

    def styles(self) -> list[str]:
        """The style labels present, factual first."""
        found = sorted({r.style for r in self.records} - {FACTUAL})
        return [FACTUAL, *found]

    def extend(self, other: "CaptionData") -> None:
        self.records.extend(other.records)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_flickr8k(data_dir: str | Path) -> CaptionData:
    """Flickr8k.token.txt + the official split files; `images/` (or Flicker8k_Dataset/) beside them."""
    data_dir = Path(data_dir)
    image_dir = next((data_dir / d for d in ("images", "Flicker8k_Dataset", "Flickr8k_Dataset")
                      if (data_dir / d).is_dir()), data_dir / "images")
    split_of: dict[str, str] = {}
    for split, name in (("train", "trainImages"), ("dev", "devImages"), ("test", "testImages")):
        split_file = data_dir / f"Flickr_8k.{name}.txt"
        if split_file.exists():
            split_of.update(dict.fromkeys(_read_lines(split_file), split))
    records, bogus = [], set()
    for line in _read_lines(data_dir / "Flickr8k.token.txt"):
        key, _, caption = line.partition("\t")
        image = key.split("#")[0]
        if not image.endswith(".jpg"):  # e.g. "2258277193_586949ec62.jpg.1": no such image
            bogus.add(image)
            continue
        records.append(Record(image, caption.strip(), split_of.get(image, "none")))
    for image in sorted(bogus):
        log.warning("Flickr8k.token.txt: skipping captions of bogus key %r (no such image)", image)
    return CaptionData(image_dir, records)


def read_coco(annotation_file: str | Path, image_dir: str | Path, split: str = "train") -> CaptionData:
    """A COCO captions file (captions_train2017.json or captions_val2017.json) and its image folder."""
    data = json.loads(Path(annotation_file).read_text())
    names = {img["id"]: img["file_name"] for img in data["images"]}
    records = [Record(names[a["image_id"]], a["caption"].strip(), split) for a in data["annotations"]]
    return CaptionData(Path(image_dir), records)


COCO_HELD_OUT = 2500  # images in each of dev and test (at most)


def coco_split_policy(val_images: list[str], train_images: list[str]) -> dict[str, str]:
    """image -> dev/test for COCO 2017, which publishes no test captions. Fixed and documented:

    - with captions_val2017.json: val2017 sorted by file name (= image id); the first half is dev,
      the second half test (2,500 + 2,500). All of train2017 trains.
    - without it (e.g. a sample of train2017 only): dev and test are carved out of train2017, the
      last images by file name: 10% each, at most 2,500 each; dev comes before test.
    """
    if val_images:
        ordered = sorted(val_images)
        half = len(ordered) // 2
        return dict.fromkeys(ordered[:half], "dev") | dict.fromkeys(ordered[half:], "test")
    ordered = sorted(train_images)
    k = min(COCO_HELD_OUT, len(ordered) // 10)
    if not k:
        log.warning("COCO: only %d images and no captions_val2017.json: no dev or test images", len(ordered))
        return {}
    held = ordered[len(ordered) - 2 * k:]
    return dict.fromkeys(held[:k], "dev") | dict.fromkeys(held[k:], "test")


def read_coco_dir(data_dir: str | Path) -> CaptionData:
    """A COCO 2017 folder: annotations/captions_{train,val}2017.json with train2017/, val2017/.

    Image names are relative to the folder (`train2017/000000000009.jpg`); dev and test follow
    `coco_split_policy`.
    """
    data_dir = Path(data_dir)
    parts: dict[str, CaptionData] = {}
    for coco_split in ("train2017", "val2017"):
        ann = data_dir / "annotations" / f"captions_{coco_split}.json"
        if ann.exists():
            part = read_coco(ann, data_dir / coco_split, "train")
            part.records = [Record(f"{coco_split}/{r.image}", r.caption, r.split) for r in part.records]
            parts[coco_split] = part
    if not parts:
        raise FileNotFoundError(f"{data_dir}: no annotations/captions_*2017.json found")
    empty = CaptionData(data_dir)
    held_out = coco_split_policy(parts.get("val2017", empty).images(), parts.get("train2017", empty).images())
    records = [Record(r.image, r.caption, held_out.get(r.image, "train" if name == "train2017" else "none"))
               for name, part in parts.items() for r in part.records]
    return CaptionData(data_dir, records)


def read_style_jsonl(path: str | Path, image_dir: str | Path) -> CaptionData:
    """Style-labelled captions, one JSON object a line: {"image", "split", "style", "caption"}."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        try:
            records.append(Record(d["image"], d["caption"].strip(), d["split"], d["style"].strip().lower()))
        except KeyError as e:
            raise ValueError(f"{path}:{n}: missing field {e}") from e
    return CaptionData(Path(image_dir), records)


def read_caption_text(path: str | Path) -> list[str]:
    """Captions without photos, one JSON object a line with a "caption" (the COCO caption text)."""
    return [json.loads(line)["caption"] for line in Path(path).read_text().splitlines() if line.strip()]


def load_dataset(name: str, data_dir: str | Path) -> CaptionData:
    if name == "flickr8k":
        return read_flickr8k(data_dir)
    if name == "coco":
        return read_coco_dir(data_dir)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
