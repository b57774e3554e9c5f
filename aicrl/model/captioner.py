"""Encoder + decoder + vocabulary as one object, saved and loaded as a model folder.

A model folder (the Hugging Face `save_pretrained` shape):
    config.json         CaptionerConfig
    model.safetensors   decoder weights (fp16), plus `encoder.*` when the encoder was fine-tuned
    vocab.json          the vocabulary
    metrics.json        evaluation results (optional)
    COMMAND.txt         how it was made: the exact commands (optional)
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from ..config import MAX_BEAM_SIZE, CaptionerConfig
from ..data.features import autocast_dtype
from ..data.images import ImageSource, preprocess
from ..data.vocab import Vocabulary, is_content_word
from ..decoding import Hypothesis, beam_search, greedy
from .decoder import AttentionLSTMDecoder
from .encoders import ImageEncoder, build_encoder
from .tags import classifier_head, tags_from_features

GRID = 7  # the encoders' feature grid is 7x7 at 224 px


def default_model_dir() -> Path:
    """The model shipped inside the package."""
    return Path(str(resources.files("aicrl") / "pretrained"))


@dataclass
class Caption:
    text: str
    score: float  # the beam's ranking score: logprob / length**length_penalty (higher is better)
    logprob: float  # total log-probability of the caption
    words: list[str]
    attention: list[list[float]]  # one row of GRID*GRID weights per word

    def to_dict(self, logprob: bool = False) -> dict:
        """The caption as the API, the gallery and `aicrl caption --json` give it."""
        return {"text": self.text, "score": round(float(self.score), 4)} | (
            {"logprob": round(float(self.logprob), 4)} if logprob else {})


@dataclass
class CaptionResult:
    captions: list[Caption]  # best first
    style: str
    timing_ms: dict[str, float] = field(default_factory=dict)
    tags: list[dict] = field(default_factory=list)  # ImageNet labels, see model/tags.py

    def to_dict(self, attention: bool = False) -> dict:
        caps = [c.to_dict(logprob=True) | ({"words": c.words, "attention": c.attention} if attention else {})
                for c in self.captions]
        return {"captions": caps, "style": self.style, "tags": self.tags, "timing_ms": self.timing_ms}


class Captioner:
    """The whole captioning model. `Captioner.from_pretrained()` loads the shipped one."""

    def __init__(self, config: CaptionerConfig, vocab: Vocabulary, decoder: AttentionLSTMDecoder,
                 encoder: ImageEncoder | None = None):
        self.config, self.vocab, self.decoder = config, vocab, decoder.eval()
        self.content_words = torch.tensor([is_content_word(w) for w in vocab.itos])
        self._encoder = encoder
        self.encoder_finetuned = False

    @property
    def encoder(self) -> ImageEncoder:
        if self._encoder is None:  # built lazily: training from cached features never needs it
            self._encoder = build_encoder(self.config.encoder).eval()
        return self._encoder

    @property
    def styles(self) -> list[str]:
        return list(self.config.styles)

    # --- saving and loading ---

    def save_pretrained(self, path: str | Path, metrics: dict | None = None, command: str | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.to_json(path / "config.json")
        self.vocab.save(path / "vocab.json")
        tensors = {k: v.detach().half().contiguous() for k, v in self.decoder.state_dict().items()}
        if self.encoder_finetuned:  # only the fine-tuned last stage; the rest is the pretrained encoder
            tensors |= {f"encoder.{k}": v.detach().half().contiguous()
                        for k, v in self.encoder.state_dict().items()
                        if v.is_floating_point() and self.encoder.in_last_stage(k)}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        if metrics is not None:
            (path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if command is not None:
            (path / "COMMAND.txt").write_text(command.strip() + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, encoder: ImageEncoder | None = None) -> "Captioner":
        path = Path(path) if path else default_model_dir()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
        config = CaptionerConfig.from_json(path / "config.json")
        vocab = Vocabulary.load(path / "vocab.json")
        tensors = load_file(str(path / "model.safetensors"))
        decoder = AttentionLSTMDecoder(config)
        decoder.load_state_dict({k: v.float() for k, v in tensors.items() if not k.startswith("encoder.")})
        model = cls(config, vocab, decoder, encoder)
        encoder_state = {k[8:]: v.float() for k, v in tensors.items() if k.startswith("encoder.")}
        if encoder_state:
            model.encoder.load_state_dict(encoder_state, strict=False)
            model.encoder_finetuned = True
        return model

    # --- inference ---

    def style_ids(self, style: str | None, n: int) -> torch.Tensor | None:
        if style in (None, "", self.styles[0]) and len(self.styles) == 1:
            return None
        style = style or self.styles[0]
        if style not in self.styles:
            raise ValueError(f"unknown style {style!r}; this model knows {self.styles}")
        return torch.full((n,), self.styles.index(style), dtype=torch.long)

    @torch.inference_mode()
    def encode(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Images -> (B, regions, dim) grids, with the same precision as the training cache."""
        batch = torch.stack([preprocess(img) for img in images]).contiguous(memory_format=torch.channels_last)
        dtype = autocast_dtype(self.config.precision)
        with torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
            return self.encoder(batch).float()

    def decode(self, features: torch.Tensor, beam_size: int = 3, n_best: int = 1,
               style: str | None = None, max_length: int | None = None,
               guidance: float | None = None) -> list[list[Hypothesis]]:
        styles = self.style_ids(style, features.size(0))
        max_length = max_length or self.config.max_length
        guidance = self.config.style_guidance if guidance is None else guidance
        # A styled caption is contrasted with the default (factual) one; see decoding._word_logprobs.
        base = None if styles is None or style in (None, "", self.styles[0]) else torch.zeros_like(styles)
        content = self.content_words if self.config.block_repeats else None
        v = self.vocab
        # Decoding a few beams reads every weight at every step: bf16 halves that traffic
        # (1.6x faster for one image here); scores are still accumulated in fp32.
        dtype = autocast_dtype(self.config.precision)
        with torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
            if beam_size == 1:
                return [[h] for h in greedy(self.decoder, features, v.start, v.end, max_length, styles,
                                            base, guidance, content)]
            return beam_search(self.decoder, features, v.start, v.end, beam_size, n_best, max_length,
                               styles, self.config.length_penalty, base, guidance, content)

    def caption(self, images: Sequence[ImageSource], beam_size: int = 3, n_best: int = 1,
                style: str | None = None, max_length: int | None = None) -> list[CaptionResult]:
        """Caption a batch of images (paths, bytes or PIL images). Raises ImageLoadError on a bad one."""
        if not 1 <= beam_size <= MAX_BEAM_SIZE:
            raise ValueError(f"beam_size must be between 1 and {MAX_BEAM_SIZE}")
        t0 = time.perf_counter()
        features = self.encode(images)
        head = classifier_head(self.encoder)  # the tags come from the same features
        tags = tags_from_features(head, features) if head is not None else [[] for _ in images]
        t1 = time.perf_counter()
        hyps = self.decode(features, beam_size, n_best, style, max_length)
        t2 = time.perf_counter()
        timing = {"encode": round((t1 - t0) * 1000 / len(images), 1),
                  "decode": round((t2 - t1) * 1000 / len(images), 1)}
        style = style or self.styles[0]
        results = []
        for image_hyps, image_tags in zip(hyps, tags):
            captions = [Caption(self.vocab.decode(h.tokens), h.score, h.logprob, [self.vocab.itos[t] for t in h.tokens],
                                [[round(float(a), 4) for a in row] for row in h.attention])
                        for h in image_hyps]
            results.append(CaptionResult(captions, style, dict(timing), image_tags))
        return results
