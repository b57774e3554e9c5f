"""The fluency judge at run time: how likely a caption is one well-formed sentence (0 to 1).

A language model of human captions judges a caption by its weakest word (the lowest SLOR), mapped
to a probability (aicrl/fluency_training.py, `aicrl fit-fluency`). It is exported into the model
folder as fluency.onnx and runs here on ONNX Runtime with numpy only (no torch), so serving can use
it. Decoding reranks styled captions and variants with it (Captioner._rerank, config fluency_weight
and fluency_pool); `aicrl evaluate` reports it. It ranks one model's captions the way blind readers
do, but rates any model's captions above people's (docs/blind_rating.md): compare decodings with
it, and models with people through a blind rating. It reads the model's own word ids, so it lives
in that model's folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .data.vocab import tokenize
from .model.folder import ModelFolder

MAX_WORDS = 30  # longer captions are judged on their first 30 words


class FluencyJudge:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._session = None  # loaded at the first caption judged: factual captioning never pays for it

    @property
    def session(self):
        if self._session is None:
            from .runtime import _session

            self._session = _session(self.path, threads=1)  # a few short captions: one thread is fastest
        return self._session

    @classmethod
    def load(cls, model_dir: str | Path) -> "FluencyJudge | None":
        """The folder's judge, or None when it has none."""
        path = ModelFolder(model_dir).fluency
        return cls(path) if path.is_file() else None

    def score_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """P(well-formed) of each row of word ids (no <start>/<end>)."""
        rows = [list(r)[:MAX_WORDS] or [0] for r in rows]
        if not rows:
            return np.zeros(0, dtype=np.float32)
        ids = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        logits = self.session.run(None, {"ids": ids})[0]
        return (1 / (1 + np.exp(-logits))).astype(np.float32)

    def score(self, captions: Sequence[str], stoi: dict[str, int], unk: int) -> np.ndarray:
        return self.score_ids([[stoi.get(w, unk) for w in tokenize(c)] for c in captions])
