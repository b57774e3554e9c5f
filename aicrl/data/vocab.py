"""Word-level tokenizer and vocabulary, saved as JSON."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_NOT_WORD = re.compile(r"[^a-z0-9' ]+")
# Words that legitimately repeat in a caption ("a man in a red shirt on a red bike"); other words
# said over and over ("a blue shirt and blue shirt") are a decoding loop, see decoding/processors.py.
FUNCTION_WORDS = frozenset(
    "a an the and or but of in on at to into onto over under through from with without by for as "
    "near next while is are was were be being his her their its he she they it this that there "
    "up down out off one two some".split())
# A photo flipped left to right shows the same scene with these words swapped in its captions.
MIRROR_SWAPS = {"left": "right", "right": "left"}


def tokenize(text: str) -> list[str]:
    """Lowercase, strip punctuation, split on whitespace ("A dog's ball." -> [a, dog's, ball])."""
    text = _NOT_WORD.sub(" ", text.lower().replace("`", "'"))
    return [w.strip("'") for w in text.split() if w.strip("'")]


def is_content_word(word: str) -> bool:
    """The one definition of a content word: not a function word, not a special token. Decoding
    bans content-word loops with it; evaluation measures content overlap with it."""
    return word not in FUNCTION_WORDS and word not in SPECIALS


def content_words(text: str) -> set[str]:
    return {w for w in tokenize(text) if is_content_word(w)}


NGRAM_ORDERS = (2, 3)  # bigrams and trigrams: the phrases a style over-uses (aicrl/phrases.py)


def ngram_shares(captions: Iterable[str], orders: Sequence[int] = NGRAM_ORDERS) -> dict[str, float]:
    """For every word n-gram (n in `orders`), the share of the captions that contain it."""
    captions = [tokenize(c) for c in captions]
    counts = Counter(" ".join(g) for c in captions for n in orders for g in {tuple(c[i:i + n])
                                                                             for i in range(len(c) - n + 1)})
    return {g: k / max(len(captions), 1) for g, k in counts.items()}


def trigram_shares(captions: Iterable[str]) -> dict[str, float]:
    return ngram_shares(captions, (3,))


def said_once(captions: Iterable[str], max_share: float = 0.02, min_captions: int = 30) -> list[str]:
    """The content words people almost never say twice in one caption: of the captions that use the
    word (at least `min_captions` of them), under `max_share` use it twice. "kitchen" (0.6% of the
    Flickr8k and COCO captions that have it), "field" (0%), "woman" (1.8%) are; "man" (2.7%), "white"
    (4%) and "dog" (9%: "a black dog and a brown dog") are not. A decoder that says one of them again
    is nearly always looping ("a kitchen in a kitchen"), so decoding allows it once (NoRepeats)."""
    using, twice = Counter(), Counter()
    for caption in captions:
        for word, n in Counter(tokenize(caption)).items():
            using[word] += 1
            twice[word] += n >= 2
    return sorted(w for w, n in using.items() if n >= min_captions and is_content_word(w) and twice[w] < max_share * n)


class Vocabulary:
    """The words a model knows (`itos`, ids in order), and those of them its training captions say at
    most once a caption (`once`, see `said_once`)."""

    def __init__(self, words: Sequence[str], once: Iterable[str] = ()):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        self.itos = list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.once = frozenset(w for w in once if w in self.stoi)
        self.pad, self.start, self.end, self.unk = (self.stoi[s] for s in SPECIALS)

    def mirror_ids(self) -> list[int]:
        """A permutation of the word ids that swaps left and right (captions of a mirrored photo)."""
        ids = list(range(len(self.itos)))
        for word, other in MIRROR_SWAPS.items():
            if word in self.stoi and other in self.stoi:
                ids[self.stoi[word]] = self.stoi[other]
        return ids

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 5) -> "Vocabulary":
        """Words seen at least `min_freq` times, most frequent first (pass training captions only)."""
        captions = list(captions)
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept], said_once(captions))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """Caption -> [<start>, words..., <end>], words cut to `max_len` if given."""
        ids = [self.stoi.get(w, self.unk) for w in tokenize(text)]
        if max_len is not None:
            ids = ids[:max_len]
        return [self.start, *ids, self.end]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, stopping at <end> and dropping <start>/<pad>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i in (self.start, self.pad):
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"itos": self.itos, "said_once": sorted(self.once)}, indent=0))

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        data = json.loads(Path(path).read_text())
        return cls(data["itos"], data.get("said_once", ()))  # older folders: none
