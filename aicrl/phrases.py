"""A style's stock phrases, learnt from the model's own captions and made to cost more at decode time.

A style can pass its classifier by gluing a few stock phrases onto a factual caption ("to impress
his lover" in 40% of the romantic captions): read ten of them and the trick shows. `fit_phrases`
captions training images in each style and finds the word bigrams and trigrams that land in more of
the captions than `target` and than people writing in that style use them (their share among the
style's human training captions: "in a" is in 40% of them, "to impress" in 1%); decoding then lowers
the logit of the word that would complete such an n-gram by `strength * log(share / allowed)`.
Fitting runs in rounds: once the first stock phrases cost more, the model reaches for the next ones,
which the next round finds (an n-gram keeps the largest share it was ever seen with). Saved as
phrases.json in the model folder:

    {"target": 0.03, "strength": 1.0,
     "styles": {"romantic": {"to impress": [0.41, 0.012], ...}}}     n-gram: [model share, human share]
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .data.vocab import ngram_shares, trigram_shares
from .model.folder import ModelFolder


class PhrasePenalty:
    """The decode-time side, a logit processor (aicrl/decoding/processors.py): the words that would
    complete a stock phrase cost more. `table` maps a context (the last word, or the last two) to
    (next words, penalties)."""

    def __init__(self, table: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]], vocab_size: int):
        self.table, self.vocab_size = table, vocab_size
        self.orders = sorted({len(k) for k in table})

    def penalty(self, history: np.ndarray) -> np.ndarray | None:
        out = None
        for n in self.orders:
            if history.shape[1] < n:
                continue
            for row, context in enumerate(map(tuple, history[:, -n:].tolist())):
                hit = self.table.get(context)
                if hit is not None:
                    if out is None:
                        out = np.zeros((len(history), self.vocab_size), dtype=np.float32)
                    out[row, hit[0]] += hit[1]
        return out

    def __call__(self, scores: np.ndarray, ctx) -> np.ndarray:
        penalty = self.penalty(ctx.history)
        return scores if penalty is None else scores - penalty


@dataclass
class OverusedPhrases:
    styles: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # style -> n-gram -> [share, human]
    target: float = 0.03  # no n-gram costs more below this share
    strength: float = 1.0  # nats of logit per e-fold of over-use

    def allowed(self, human: float) -> float:
        return max(self.target, human)

    def for_style(self, style: str, stoi: dict[str, int], vocab_size: int) -> PhrasePenalty | None:
        """The penalty table of `style` in vocabulary ids (None when the style has no stock phrases)."""
        grouped: dict[tuple[int, ...], dict[int, float]] = {}
        for gram, (share, human) in self.styles.get(style, {}).items():
            ids = [stoi.get(w) for w in gram.split()]
            if share > self.allowed(human) and None not in ids:
                grouped.setdefault(tuple(ids[:-1]), {})[ids[-1]] = self.strength * math.log(share / self.allowed(human))
        if not grouped:
            return None
        table = {k: (np.array(list(v), dtype=np.int64), np.array(list(v.values()), dtype=np.float32))
                 for k, v in grouped.items()}
        return PhrasePenalty(table, vocab_size)

    def update(self, style: str, shares: dict[str, float], human: dict[str, float] | None = None) -> int:
        """Record the n-grams of `shares` used more than allowed (`human`: their share among the
        style's human captions); returns how many are new."""
        known, human = self.styles.setdefault(style, {}), human or {}
        new = 0
        for gram, share in shares.items():
            people = human.get(gram, 0.0)
            if share > self.allowed(people):
                new += gram not in known
                known[gram] = [round(max(share, known.get(gram, [0.0])[0]), 4), round(people, 4)]
        return new

    def save(self, model_dir: str | Path) -> None:
        data = {"target": self.target, "strength": self.strength,
                "styles": {s: dict(sorted(t.items(), key=lambda kv: -kv[1][0])) for s, t in self.styles.items()}}
        ModelFolder(model_dir).phrases.write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path) -> "OverusedPhrases | None":
        path = ModelFolder(model_dir).phrases
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls({s: {g: [float(v[0]), float(v[1])] for g, v in t.items()} for s, t in data.get("styles", {}).items()},
                   float(data.get("target", 0.03)), float(data.get("strength", 1.0)))


def fit_phrases(captioner, names: Sequence[str], features_of: Callable[[list[str]], object],
                styles: Sequence[str], human: dict[str, Sequence[str]] | None = None, rounds: int = 3,
                target: float = 0.03, strength: float = 1.0, batch_size: int = 50,
                log: Callable[[str], None] = print) -> OverusedPhrases:
    """Learn each style's stock phrases from the model's captions of `names` (training images);
    `human`: per style, people's captions in that style (its training captions)."""
    from .evaluation import caption_images

    phrases, before = OverusedPhrases(target=target, strength=strength), captioner.phrases
    people = {s: ngram_shares(c) for s, c in (human or {}).items()}
    captioner.phrases = phrases  # each round decodes with what the rounds before it found
    try:
        for r in range(1, rounds + 1):
            for style in styles:
                captions = caption_images(captioner, list(names), features_of, style=style, batch_size=batch_size)
                top = max(trigram_shares(captions.values()).items(), key=lambda kv: kv[1], default=("", 0.0))
                new = phrases.update(style, ngram_shares(captions.values()), people.get(style))
                log(f"round {r}, {style}: top trigram {top[0]!r} in {top[1]:.1%} of captions, "
                    f"{new} new over-used n-grams, {len(phrases.styles[style])} in all")
    finally:
        captioner.phrases = before
    return phrases
