"""The torch decoder as a `decoding.StepDecoder`: the search runs on numpy, the steps in torch
(training's dev evaluation, `aicrl evaluate --backend torch`, and `aicrl export`'s reference)."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from .decoder import CaptionDecoder


class TorchSteps:
    """State: (features, projected, style, recurrent state tuple) torch tensors, one row per beam.
    `dtype` is the autocast type of the steps (bf16 halves the weight traffic of a few beams; scores
    stay fp32)."""

    def __init__(self, decoder: CaptionDecoder, dtype: torch.dtype | None = None):
        self.decoder, self.dtype = decoder.eval(), dtype

    def _autocast(self):
        device = next(self.decoder.parameters()).device
        return torch.autocast(device.type, dtype=self.dtype) if self.dtype else nullcontext()

    @torch.inference_mode()
    def start(self, features: np.ndarray, styles: np.ndarray | None, repeat: int = 1, concepts=None):
        device = next(self.decoder.parameters()).device
        feats = torch.as_tensor(features, device=device)
        ids = None if styles is None else torch.as_tensor(styles, dtype=torch.long, device=device)
        if concepts is not None:
            concepts = (torch.as_tensor(concepts[0], dtype=torch.long, device=device),
                        torch.as_tensor(concepts[1], dtype=torch.float32, device=device))
        with self._autocast():
            feats, projected, style, recurrent = self.decoder.start(feats, ids, concepts)
        if repeat > 1:
            feats, projected, style, recurrent = _rows(
                (feats, projected, style, recurrent), lambda x: x.repeat_interleave(repeat, 0))
        return feats, projected, style, recurrent

    @torch.inference_mode()
    def step(self, words: np.ndarray, state):
        feats, projected, style, recurrent = state
        words = torch.as_tensor(words, dtype=torch.long, device=feats.device)
        with self._autocast():
            logits, recurrent, alpha = self.decoder.step(words, recurrent, feats, projected, style)
        return (logits.float().cpu().numpy(), (feats, projected, style, recurrent), alpha.float().cpu().numpy())

    def reorder(self, state, rows: np.ndarray):
        # Beams move only within their image, so the image context (features, projection, style)
        # is the same for every row of an image: only the recurrent state is gathered.
        feats, projected, style, recurrent = state
        index = torch.as_tensor(rows, device=feats.device)
        return feats, projected, style, tuple(x[index] for x in recurrent)

    def select(self, state, rows: np.ndarray):
        index = torch.as_tensor(rows, device=state[0].device)
        return _rows(state, lambda x: x[index])


def _rows(state, take):
    """Apply `take` to every tensor of a (features, projected, style, recurrent) state."""
    feats, projected, style, recurrent = state
    return (take(feats), take(projected), None if style is None else take(style),
            tuple(take(x) for x in recurrent))
