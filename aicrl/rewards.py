"""CIDEr-D as a reward for self-critical training, with document frequencies computed once.

The same formula as the coco-caption toolkit's `Cider` (pycocoevalcap's cider_scorer, which is
CIDEr-D: clipped n-gram counts and a Gaussian length penalty, sigma 6, times 10), but the document
frequencies come from a fixed corpus (the training references) instead of the captions being scored,
and every image's reference vectors are built once. Scoring a caption then costs one n-gram count
and a few dictionary lookups: tens of thousands of captions per second.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Iterable, Sequence

N = 4  # n-grams of 1..4 words
SIGMA = 6.0

NGram = tuple[str, ...]


def ngrams(words: Sequence[str], n: int = N) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D of captions (lists of words) against references, document frequencies fixed at
    construction: `CiderD(train_refs)` where train_refs maps image -> its reference captions (word lists)."""

    def __init__(self, references: dict[str, list[list[str]]]):
        df: defaultdict[NGram, int] = defaultdict(int)
        for refs in references.values():
            for gram in set().union(*(ngrams(r) for r in refs)):
                df[gram] += 1
        self.log_images = math.log(float(len(references)))
        self.log_df = {g: math.log(max(1.0, n)) for g, n in df.items()}
        self._refs: dict[str, list[tuple]] = {}

    def _vector(self, words: Sequence[str]):
        """tf-idf vector split by n-gram order, the norms, and the 'length' (as the toolkit counts it:
        the number of bigrams)."""
        vec: list[dict[NGram, float]] = [{} for _ in range(N)]
        norm = [0.0] * N
        length = 0
        for gram, tf in ngrams(words).items():
            n = len(gram) - 1
            v = tf * (self.log_images - self.log_df.get(gram, 0.0))
            vec[n][gram] = v
            norm[n] += v * v
            if n == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _reference_vectors(self, image: str, refs: list[list[str]]) -> list[tuple]:
        if image not in self._refs:
            self._refs[image] = [self._vector(r) for r in refs]
        return self._refs[image]

    def score(self, caption: Sequence[str], refs: list[list[str]], image: str | None = None) -> float:
        """CIDEr-D of one caption; pass `image` to reuse that image's reference vectors."""
        ref_vecs = self._reference_vectors(image, refs) if image is not None else [self._vector(r) for r in refs]
        vec, norm, length = self._vector(caption)
        total = 0.0
        for vec_r, norm_r, length_r in ref_vecs:
            penalty = math.exp(-((length - length_r) ** 2) / (2 * SIGMA ** 2))
            for n in range(N):
                val = sum(min(v, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, v in vec[n].items())
                if norm[n] and norm_r[n]:
                    val /= norm[n] * norm_r[n]
                total += val * penalty
        return total / N / len(ref_vecs) * 10.0

    def scores(self, captions: Iterable[Sequence[str]], images: Sequence[str],
               references: dict[str, list[list[str]]]) -> list[float]:
        """CIDEr-D of each caption against the references of its image (images[i] for captions[i])."""
        return [self.score(c, references[i], i) for c, i in zip(captions, images)]
