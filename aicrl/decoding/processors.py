"""The per-word rules of decoding, each a small processor over the next word's scores.

A processor takes the (N, V) scores of the next word for N rows (beams or samples) and the
`StepContext` of the step, and returns new scores, as Hugging Face's `LogitsProcessor` does. The
search applies them in order and takes a log-softmax at the end, so a rule that bans a word sets
it to -inf, a penalty subtracts, a bonus adds. A new rule (a tag bonus, a constraint) is one more
item in `GenerationOptions.processors`, not a new branch inside the search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..data.vocab import SPECIALS, UNK

NEG_INF = np.float32(-np.inf)


@dataclass
class StepContext:
    """What a processor may look at besides the scores."""
    t: int  # words emitted so far (0 at the first word)
    history: np.ndarray  # (N, t) the rows' words so far
    images: np.ndarray  # (N,) the batch image each row belongs to (for per-image rules)
    base_logits: np.ndarray | None = None  # (N, V) the same rows in the base style (see StyleGuidance)


class LogitsProcessor(Protocol):
    def __call__(self, scores: np.ndarray, ctx: StepContext) -> np.ndarray: ...


def log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    shifted = x - top
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@dataclass
class SpecialTokens:
    """<pad>, <start> and <unk> are never generated, and <end> not as the first word (an empty
    caption helps nobody). The search always applies it first, to the base style's logits too."""
    start: int
    end: int

    def __call__(self, scores: np.ndarray, ctx: StepContext) -> np.ndarray:
        scores = np.array(scores, dtype=np.float32)  # a copy: the caller's logits stay as they are
        scores[:, [0, self.start, SPECIALS.index(UNK)]] = NEG_INF  # <pad> is 0 in every vocabulary
        if ctx.t == 0:
            scores[:, self.end] = NEG_INF
        return scores


def repetition_bans(history: np.ndarray, content: np.ndarray, once: np.ndarray | None = None) -> np.ndarray:
    """(N, V) mask of the words that would make a row of `history` (N, t) loop: the word just said
    ("a beautiful beautiful sunset"), the second word of a pair of content words said before (after
    "a blue shirt and blue", "shirt"), and a content word said twice already ("blue shirt and blue
    shorts and blue ..."). `content` (V,) marks the content words; function words ("in a", "a red")
    may otherwise repeat freely, but no three words twice ("a plate of food with a plate of food",
    Hugging Face's no_repeat_ngram_size=3). `once` (V,) marks words said at most once ("a pizza with a
    pizza on it"): the names of things, where a second mention is almost always a loop."""
    history, content = np.asarray(history, dtype=np.int64), np.asarray(content, dtype=bool)
    n, t = history.shape
    ban = np.zeros((n, content.size), dtype=bool)
    if t >= 1:
        ban[np.arange(n), history[:, -1]] = True
    if t >= 2:
        before, after = history[:, :-1], history[:, 1:]
        hit = (before == history[:, -1:]) & content[before] & content[after]
        rows, cols = np.nonzero(hit)
        ban[rows, after[rows, cols]] = True
        trigram = (history[:, :-2] == history[:, -2:-1]) & (history[:, 1:-1] == history[:, -1:])
        rows, cols = np.nonzero(trigram)
        ban[rows, history[rows, cols + 2]] = True
        counts = np.zeros(ban.shape, dtype=np.int32)
        index = np.arange(n)
        for j in range(t):
            counts[index, history[:, j]] += 1
        ban |= (counts >= 2) & content
        if once is not None:
            ban |= (counts >= 1) & once
        ban[:, 0] = False
    return ban


@dataclass
class NoRepeats:
    """No content-word loops (`repetition_bans`)."""
    content: np.ndarray  # (V,) bool: the content words
    once: np.ndarray | None = None  # (V,) bool: words said at most once

    def __call__(self, scores: np.ndarray, ctx: StepContext) -> np.ndarray:
        return np.where(repetition_bans(ctx.history, self.content, self.once), NEG_INF, scores)


@dataclass
class WordBonus:
    """Adds a per-image bonus (B, V) to the words' scores: words the photo's tags name gain, words
    nothing in the photo supports lose (see model/grounding.py)."""
    bonus: np.ndarray  # (B, V) float32, indexed by the rows' images

    def __call__(self, scores: np.ndarray, ctx: StepContext) -> np.ndarray:
        return scores + self.bonus[ctx.images]


@dataclass
class StyleGuidance:
    """Pushes a styled distribution away from the base (factual) one: log p + w (log p - log p_base),
    the words a style prefers over plain description. Only words the style itself finds plausible
    (p >= keep * max p, the constraint of contrastive decoding) can win, so content stays sane.
    Needs the search to decode the base style alongside (`GenerationOptions.base_styles`). `weight`:
    one for every image, or (B,) one per image."""
    weight: float | np.ndarray
    keep: float = 0.1

    def __call__(self, scores: np.ndarray, ctx: StepContext) -> np.ndarray:
        if ctx.base_logits is None or not np.any(self.weight):
            return scores
        weight = np.float32(self.weight) if np.ndim(self.weight) == 0 else \
            np.asarray(self.weight, dtype=np.float32)[ctx.images][:, None]
        lp = log_softmax(scores)
        plausible = lp >= lp.max(-1, keepdims=True) + np.float32(math.log(self.keep))
        with np.errstate(invalid="ignore"):  # -inf - -inf where a word is banned in both: masked out here
            guided = lp + weight * (lp - log_softmax(ctx.base_logits))
        return np.where(plausible, guided, NEG_INF).astype(np.float32)


def next_word_logprobs(logits: np.ndarray, ctx: StepContext, processors) -> np.ndarray:
    """Log-probabilities of the next word: the processors in order, then a log-softmax."""
    scores = np.asarray(logits, dtype=np.float32)
    for processor in processors:
        scores = processor(scores, ctx)
    return log_softmax(scores)
