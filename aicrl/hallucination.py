"""Grounding measures: does a caption name things that are not in the photo?

- CHAIR (Rohrbach et al. 2018, "Object hallucination in image captioning"): the COCO objects a
  caption names (80 classes and their synonyms, the CHAIR synonyms file) against the objects the
  image's references name. CHAIR-s: share of captions naming at least one object no reference
  names; CHAIR-i: share of named objects that no reference names. Plurals are singularized by rule
  and two-word synonyms ("hot dog", "teddy bear") matched before single words, as the original does.
- person/dog: share of captions naming a person or a dog where no reference does.
- tag agreement: of the photos with an ImageNet tag word at or above TAG_THRESHOLD (concept table),
  the share whose caption names that word (any of its forms) or its COCO class.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .model.concepts import DOG_WORDS, PERSON_WORDS, ConceptTable, singular

TAG_THRESHOLD = 0.5
SYNONYMS_DEFAULT = Path("..") / "chair" / "synonyms.txt"  # relative to the dataset folder


def read_synonyms(path: str | Path) -> dict[str, str]:
    """CHAIR synonyms file (one COCO class a line, the class name first, then its synonyms, comma
    separated) -> {synonym: class}."""
    table: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        names = [n.strip().lower() for n in line.split(",") if n.strip()]
        for name in names:
            table.setdefault(name, names[0])
    if not table:
        raise ValueError(f"{path}: no object classes in it")
    return table


def caption_words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def mentions(caption: str, phrases: set[str] | frozenset[str] | dict) -> list[str]:
    """The phrases (one or two words, as written or singular) a caption uses, longest match first
    ("hot dog" is not also a "dog")."""
    words = caption_words(caption)
    found, i = [], 0
    while i < len(words):
        pair = " ".join(words[i:i + 2]) if i + 1 < len(words) else None
        if pair and (pair in phrases or singular_phrase(pair) in phrases):
            found.append(pair if pair in phrases else singular_phrase(pair))
            i += 2
            continue
        word = words[i] if words[i] in phrases else singular(words[i])
        if word in phrases:
            found.append(word)
        i += 1
    return found


def singular_phrase(phrase: str) -> str:
    head, _, last = phrase.rpartition(" ")
    return f"{head} {singular(last)}"


def objects(caption: str, synonyms: dict[str, str]) -> set[str]:
    """The COCO classes a caption names."""
    return {synonyms[m] for m in mentions(caption, synonyms)}


def chair(predictions: dict[str, str], references: dict[str, list[str]], synonyms: dict[str, str]) -> dict:
    """CHAIR-s and CHAIR-i of the predictions against each image's references."""
    captions_with, named, hallucinated = 0, 0, 0
    for image, caption in predictions.items():
        truth = set().union(*(objects(r, synonyms) for r in references.get(image, [])))
        said = objects(caption, synonyms)
        named += len(said)
        hallucinated += len(said - truth)
        captions_with += bool(said - truth)
    return {"chair_s": round(captions_with / max(len(predictions), 1), 4),
            "chair_i": round(hallucinated / max(named, 1), 4), "objects_named": named}


def person_dog_hallucination(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """Share of captions naming a person (or a dog, or either) that none of the image's references names."""
    def invents(image: str, caption: str, words: frozenset[str]) -> bool:
        return bool(mentions(caption, words)) and not any(mentions(r, words) for r in references.get(image, []))

    flags = [(invents(i, c, PERSON_WORDS), invents(i, c, DOG_WORDS)) for i, c in predictions.items()]
    n = max(len(flags), 1)
    return {"person_or_dog": round(sum(p or d for p, d in flags) / n, 4),
            "person": round(sum(p for p, _ in flags) / n, 4), "dog": round(sum(d for _, d in flags) / n, 4)}


def tag_agreement(predictions: dict[str, str], probabilities: dict[str, np.ndarray], table: ConceptTable,
                  synonyms: dict[str, str] | None = None, threshold: float = TAG_THRESHOLD) -> dict:
    """Of the images whose likeliest tag word has probability >= threshold, how often the caption
    names it (a form of the word, or a synonym of its COCO class)."""
    tagged, agreeing = 0, 0
    for image, caption in predictions.items():
        if image not in probabilities:
            continue
        (words,) = table.concept_probabilities(probabilities[image][None], min_probability=threshold)
        if not words:
            continue
        word = next(iter(words))
        forms = table.words_of(word)
        coco = table.coco_of(word)
        if synonyms and coco:
            forms |= {s for s, c in synonyms.items() if c == coco}
        tagged += 1
        agreeing += bool(mentions(caption, forms))
    return {"tagged_images": tagged, "tag_agreement": round(agreeing / tagged, 4) if tagged else None,
            "threshold": threshold}


def grounding(predictions: dict[str, str], references: dict[str, list[str]], synonyms_file: Path | None,
              probabilities: dict[str, np.ndarray] | None = None, table: ConceptTable | None = None) -> dict:
    """All the measures, as one JSON-ready dict; a measure that lacks its input says why."""
    out: dict = {"person_dog_hallucination": person_dog_hallucination(predictions, references)}
    synonyms = read_synonyms(synonyms_file) if synonyms_file else None
    out["chair"] = (chair(predictions, references, synonyms) if synonyms else
                    "skipped: no CHAIR synonyms file (--chair-synonyms)")
    out["tags"] = (tag_agreement(predictions, probabilities, table, synonyms) if probabilities and table else
                   "skipped: the model has no ImageNet head or no concept table")
    return out


def synonyms_path(given: str | None, data_dir: str | Path | None) -> Path | None:
    """--chair-synonyms, else <data-dir>/../chair/synonyms.txt where it exists, else None."""
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"no CHAIR synonyms file at {given}")
        return Path(given)
    default = Path(data_dir) / SYNONYMS_DEFAULT if data_dir else None
    return default if default is not None and default.is_file() else None


def recording_probabilities(features_of, head: tuple[np.ndarray, np.ndarray] | None,
                            store: dict[str, np.ndarray]):
    """`features_of` that also keeps each image's ImageNet probabilities in `store` (from the same
    grids the captioner decodes: no second encoder pass)."""
    from .model.concepts import imagenet_probabilities

    def features(chunk: list[str]):
        grids = features_of(chunk)
        if head is not None:
            array = grids.detach().float().cpu().numpy() if hasattr(grids, "detach") else grids
            store.update(zip(chunk, imagenet_probabilities(head, array)))
        return grids
    return features
