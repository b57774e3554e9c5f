"""The model's settings as one plain dataclass with a JSON round trip (config.json of a model folder)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

MAX_BEAM_SIZE = 10  # the one beam limit of the page, the API and the command line
MAX_VARIANTS = 10  # likewise for the number of different captions of one photo
BACKENDS = ("auto", "onnx", "onnx-int8", "torch")  # what runs a model folder (Captioner.from_pretrained)


@dataclass
class CaptionerConfig:
    encoder: str = "efficientnet-lite2"
    decoder: str = "show-attend-tell"  # or "up-down" (model/decoder.py)
    feature_dim: int = 1280  # channels of the encoder grid
    vocab_size: int = 0  # set from the vocabulary
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    style_dim: int = 64  # size of the style embedding (used when there is more than one style)
    styles: list[str] = field(default_factory=lambda: ["factual"])
    dropout: float = 0.5
    max_length: int = 30  # longest caption decoding will produce (words)
    precision: str = "auto"  # encoder autocast at inference: auto / bf16 / fp32 (match the cache)
    length_penalty: float = 0.0  # beam score = logprob / length**length_penalty
    # how hard a non-default style is pushed away from the default one: one weight, or one per style
    style_guidance: float | dict[str, float] = 0.0
    block_repeats: bool = True  # no content-word loops ("blue shirt and blue shirt", a word a third time)
    # at most once a caption: the names of things (a concept table's words, but people and dogs: "a pizza
    # with a pizza on it") and the words the training captions almost never repeat (vocab.json
    # "said_once": "a kitchen in a kitchen")
    mention_once: bool = False
    # Grounding (model/concepts.py): the photo's `concept_tokens` most likely concepts (ImageNet classes
    # as caption words, and "person") join the grid as extra regions the decoder attends to; 0: none.
    concept_tokens: int = 0
    num_concepts: int = 0  # concepts the decoder has embeddings for (the concept table's words + person)
    # of the beam's captions, prefer those that claim nothing the encoder rules out (Captioner._rerank)
    rerank_by_agreement: bool = False
    # with the rerank, the beam is also run on the concepts alone (no grid: the decoder learnt that in
    # the grounding stage), so that a plain true caption can win where the grid's caption is false
    concept_pool: bool = False
    concept_bonus: float = 0.0  # logits added to the words of likely concepts, times their probability
    absent_penalty: float = 0.0  # logits taken from person / dog words where the encoder rules them out
    # styled captions and variants: rerank by score + w * log P(well-formed), the fluency judge's verdict
    # (fluency.onnx, aicrl/fluency.py); 0 or no judge: by score alone
    fluency_weight: float = 0.0
    # with the judge, a styled beam is also run at these fractions of the style's guidance, and the
    # rerank picks among all their captions: a gentler push is often the sentence that holds together
    fluency_pool: list[float] = field(default_factory=list)

    def guidance_for(self, style: str | None) -> float:
        """The style guidance weight of `style` (0 for a style a per-style table does not name)."""
        g = self.style_guidance
        return float(g.get(style, 0.0)) if isinstance(g, dict) else float(g)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "CaptionerConfig":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
