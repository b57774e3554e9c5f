"""Encoder + decoder + vocabulary as one object, saved and loaded as a model folder.

Saved and loaded as a model folder (the Hugging Face `save_pretrained` shape): its files are named in
aicrl/model/folder.py.

A Captioner runs on one of two backends with the same beam search (aicrl/decoding.py):
- "onnx": ONNX Runtime + numpy, no torch: inference (`pip install aicrl`);
- "torch": the torch modules: training, evaluation, export (`pip install 'aicrl[train]'`).
This module imports torch only when the torch backend is used.
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import resources, util
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..config import BACKENDS, MAX_BEAM_SIZE, MAX_VARIANTS, CaptionerConfig
from ..data.images import IMAGE_SIZE, ImageSource, decode_image, preprocess_array
from ..data.vocab import Vocabulary, is_content_word
from ..decoding import (GenerationOptions, Hypothesis, NoRepeats, StyleGuidance, WordBonus, beam_search,
                        greedy, sample)
from ..fluency import FluencyJudge
from ..phrases import OverusedPhrases
from .concepts import Agreement, ConceptTable, PersonHead, Seen, imagenet_probabilities, top_concepts
from .folder import ModelFolder
from .people import PeopleDetector
from .tags import head_weights, load_head, tags_from_features

if TYPE_CHECKING:
    from ..runtime import OnnxModel
    from .decoder import CaptionDecoder
    from .encoders import ImageEncoder

_fallbacks_said: set[str] = set()  # model folders whose ONNX fallback was reported on stderr

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
    # agreement with what the encoder sees (concepts.Agreement): confidence, unsupported, missed
    grounding: dict = field(default_factory=dict)

    def to_dict(self, logprob: bool = False) -> dict:
        """The caption as the API, the gallery and `aicrl caption --json` give it."""
        return {"text": self.text, "score": round(float(self.score), 4)} | self.grounding | (
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


def _importable(name: str) -> bool:
    try:  # without importing it: torch alone takes seconds
        return util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def torch_available() -> bool:
    return _importable("torch")


def onnxruntime_available() -> bool:
    return _importable("onnxruntime")


class Captioner:
    """The whole captioning model. `Captioner.from_pretrained()` loads the shipped one.

    Built from torch modules (`Captioner(config, vocab, decoder, encoder)`, as training does) or from
    an ONNX export (`runtime=OnnxModel(...)`, as `from_pretrained` does when it can)."""

    def __init__(self, config: CaptionerConfig, vocab: Vocabulary, decoder: "CaptionDecoder | None" = None,
                 encoder: "ImageEncoder | None" = None, *, runtime: "OnnxModel | None" = None):
        if (decoder is None) == (runtime is None):
            raise ValueError("give either a torch decoder or an ONNX runtime")
        self.config, self.vocab, self.runtime = config, vocab, runtime
        self._decoder = decoder.eval() if decoder is not None else None
        self.content_words = np.array([is_content_word(w) for w in vocab.itos])
        self._encoder = encoder
        self._encoder_finetuned = False
        self.device = "cpu"  # where the torch modules run (ONNX Runtime runs on the CPU)
        self.phrases: OverusedPhrases | None = None  # the styles' stock phrases (phrases.json)
        self.concept_table: ConceptTable | None = None  # ImageNet classes as caption words (concepts.json)
        self.person_head: PersonHead | None = None  # P(person) from the ImageNet class probabilities
        self.people: PeopleDetector | None = None  # person and face detectors (people.onnx)
        self.fluency: FluencyJudge | None = None  # P(well-formed) of a caption (fluency.onnx)

    def to(self, device) -> "Captioner":
        """Move the torch modules to a device (a torch.device or 'cpu', 'cuda', ...); returns itself."""
        import torch

        device = torch.device(device)
        if self.runtime is not None:
            if device.type != "cpu":
                raise ValueError(f"the ONNX backend runs on the CPU; use backend='torch' for {device}")
            return self
        self.device = device
        self.decoder.to(device)
        if self._encoder is not None:
            self._encoder.to(device)
        return self

    @property
    def backend(self) -> str:
        """"onnx" (ONNX Runtime, no torch) or "torch"."""
        return "torch" if self.runtime is None else "onnx"

    @property
    def decoder(self) -> "CaptionDecoder":
        if self._decoder is None:
            raise AttributeError("this Captioner runs on ONNX Runtime; load it with backend='torch' for "
                                 "the torch modules")
        return self._decoder

    @property
    def encoder(self) -> "ImageEncoder":
        if self.runtime is not None:
            raise AttributeError("this Captioner runs on ONNX Runtime; load it with backend='torch' for "
                                 "the torch modules")
        if self._encoder is None:  # built lazily: training from cached features never needs it
            import torch

            from .encoders import build_encoder

            with torch.random.fork_rng():  # building draws random weights: leave the caller's stream as it was
                self._encoder = build_encoder(self.config.encoder).eval().to(self.device)
        return self._encoder

    @property
    def encoder_finetuned(self) -> bool:
        if self.runtime is not None:
            return bool(self.runtime.manifest.get("encoder_finetuned"))
        return self._encoder_finetuned

    @encoder_finetuned.setter
    def encoder_finetuned(self, value: bool) -> None:
        self._encoder_finetuned = value

    @property
    def styles(self) -> list[str]:
        return list(self.config.styles)

    def classifier(self) -> "tuple[np.ndarray, np.ndarray] | None":
        """The encoder's ImageNet head (weight, bias) for tags, or None where there is none."""
        if not hasattr(self, "_classifier"):
            self._classifier = (load_head(self.runtime.model_dir) if self.runtime is not None
                                else head_weights(self.encoder))
        return self._classifier

    def parameter_counts(self) -> dict[str, int | None]:
        """Parameters of the encoder trunk and the decoder (for the model card)."""
        if self.runtime is not None:
            return self.runtime.parameter_counts()
        count = lambda m: int(sum(p.numel() for p in m.parameters()))  # noqa: E731
        try:
            encoder = count(self.encoder)
        except Exception:  # noqa: BLE001  (no encoder weights here: the card shows none)
            encoder = None
        return {"encoder": encoder, "decoder": count(self.decoder)}

    # --- saving and loading ---

    def save_pretrained(self, path: str | Path, metrics: dict | None = None, command: str | None = None) -> None:
        from safetensors.torch import save_file

        folder = ModelFolder(path)
        folder.path.mkdir(parents=True, exist_ok=True)
        self.config.to_json(folder.config)
        self.vocab.save(folder.vocab)
        # fp16 CPU tensors: a model folder loads on any device
        tensors = {k: v.detach().half().cpu().contiguous() for k, v in self.decoder.state_dict().items()}
        if self.encoder_finetuned:  # only the fine-tuned last stage; the rest is the pretrained encoder
            tensors |= {f"encoder.{k}": v.detach().half().cpu().contiguous()
                        for k, v in self.encoder.state_dict().items()
                        if v.is_floating_point() and self.encoder.in_last_stage(k)}
        save_file(tensors, str(folder.weights), metadata={"format": "pt"})
        # an export of other weights, and their stock phrases, are stale now
        for stale in folder.made_from_weights():
            stale.unlink(missing_ok=True)
        if self.concept_table is not None:  # the words a grounded decoder's concept ids stand for
            self.concept_table.save(folder.path)
        if self.person_head is not None:
            self.person_head.save(folder.path)
        if self.fluency is not None and self.fluency.path.resolve() != folder.fluency.resolve():
            shutil.copyfile(self.fluency.path, folder.fluency)  # it reads this vocabulary's word ids
        if self.people is not None and self.people.path.resolve() != folder.people.resolve():
            shutil.copyfile(self.people.path, folder.people)
        if metrics is not None:
            folder.write_metrics(metrics)
        if command is not None:
            folder.write_command(command)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, encoder: "ImageEncoder | None" = None,
                        backend: str = "auto", threads: int | None = None, device: str = "auto") -> "Captioner":
        """Load a model folder. `backend`: "onnx" (ONNX Runtime; the folder needs `aicrl export`),
        "onnx-int8" (its int8 graphs, `aicrl export --int8`), "torch", or "auto": ONNX (fp32) when the
        folder has an export and onnxruntime is installed (and no torch `encoder` is given), else
        torch. In auto mode a broken or stale export falls back to torch, said once on stderr, when
        torch is installed; otherwise it is an error naming the file."""
        model = cls._load(path, encoder, backend, threads, device)
        model.phrases = OverusedPhrases.load(path or default_model_dir())
        model.concept_table = ConceptTable.load(path or default_model_dir())
        model.person_head = PersonHead.load(path or default_model_dir())
        model.fluency = FluencyJudge.load(path or default_model_dir())
        model.people = PeopleDetector.load(path or default_model_dir(), threads)
        return model

    @classmethod
    def _load(cls, path, encoder, backend: str, threads: int | None, device: str) -> "Captioner":
        from ..runtime import BackendUnavailable, OnnxModel, OnnxModelError

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
        path = Path(path) if path else default_model_dir()
        folder = ModelFolder(path)
        if not folder.config.is_file():
            raise FileNotFoundError(f"{path} is not a model folder (no {folder.CONFIG})")
        config = CaptionerConfig.from_json(folder.config)
        vocab = Vocabulary.load(folder.vocab)
        if backend == "auto" and device not in ("auto", "cpu"):
            backend = "torch"  # a GPU was asked for: ONNX Runtime here runs on the CPU
        if backend == "auto":
            backend = "onnx" if encoder is None and folder.has_export() and onnxruntime_available() else "torch"
            if backend == "torch" and not torch_available():
                backend = "onnx"  # the only one there is: its error says what is missing
            elif backend == "onnx" and torch_available():
                try:
                    return cls(config, vocab, runtime=OnnxModel(path, config.encoder, threads))
                except OnnxModelError as e:
                    if str(path) not in _fallbacks_said:
                        _fallbacks_said.add(str(path))
                        print(f"aicrl: {e}; using torch instead", file=sys.stderr)
                    backend = "torch"
        if backend in ("onnx", "onnx-int8"):
            if not onnxruntime_available():
                raise BackendUnavailable("the ONNX backend needs onnxruntime: pip install onnxruntime")
            return cls(config, vocab, runtime=OnnxModel(path, config.encoder, threads, int8=backend == "onnx-int8"))
        if not torch_available():
            raise BackendUnavailable("the torch backend needs torch: pip install 'aicrl[train]'")
        from ..devices import resolve_device

        return cls._from_pretrained_torch(path, config, vocab, encoder).to(resolve_device(device))

    @classmethod
    def _from_pretrained_torch(cls, path: Path, config: CaptionerConfig, vocab: Vocabulary,
                               encoder: "ImageEncoder | None") -> "Captioner":
        from safetensors.torch import load_file

        from .decoder import build_decoder

        tensors = load_file(str(ModelFolder(path).weights))
        decoder = build_decoder(config)
        decoder.load_state_dict({k: v.float() for k, v in tensors.items() if not k.startswith("encoder.")})
        model = cls(config, vocab, decoder, encoder)
        encoder_state = {k[8:]: v.float() for k, v in tensors.items() if k.startswith("encoder.")}
        if encoder_state:
            model.encoder.load_state_dict(encoder_state, strict=False)
            model.encoder_finetuned = True
        return model

    # --- inference ---

    def style_ids(self, style: str | None, n: int) -> np.ndarray | None:
        if style in (None, "", self.styles[0]) and len(self.styles) == 1:
            return None
        style = style or self.styles[0]
        if style not in self.styles:
            raise ValueError(f"unknown style {style!r}; this model knows {self.styles}")
        return np.full(n, self.styles.index(style), dtype=np.int64)

    def steps(self):
        """The decoder as a `decoding.StepDecoder` for this backend."""
        if self.runtime is not None:
            return self.runtime.steps
        from ..devices import autocast_dtype
        from .torch_steps import TorchSteps

        # Decoding a few beams reads every weight at every step: bf16 halves that traffic
        # (1.6x faster for one image on AVX512 CPUs); scores are still accumulated in fp32.
        return TorchSteps(self.decoder, autocast_dtype(self.config.precision, self.device))

    def encode(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Images -> (B, regions, dim) float32 grids (torch: with the same precision as the training cache)."""
        batch = np.stack([preprocess_array(img) for img in images])
        if self.runtime is not None:
            return self.runtime.encode(batch)
        import torch

        from ..devices import autocast, autocast_dtype

        batch = torch.from_numpy(batch).to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, autocast_dtype(self.config.precision, self.device)):
            return self.encoder(batch).float().cpu().numpy()

    @property
    def sees_people(self) -> bool:
        """Whether P(person) comes from the person detectors too (people.onnx and the probe's mix)."""
        return self.people is not None and self.person_head is not None and self.person_head.mix is not None

    def detect_people(self, images: Sequence[ImageSource]) -> np.ndarray | None:
        """(B, 2) the person and face detectors' scores (model/people.py), or None without them."""
        return self._detect([decode_image(i, max_side=IMAGE_SIZE) for i in images]) if self.sees_people else None

    def _detect(self, pictures: list) -> np.ndarray | None:
        """`detect_people` of photos already decoded. A people.onnx that ONNX Runtime cannot load is
        said once on stderr and left out: P(person) is then the probe's, and captioning goes on."""
        from ..runtime import OnnxModelError

        if not self.sees_people:
            return None
        try:
            return self.people(pictures)
        except OnnxModelError as e:
            print(f"aicrl: {e}; people are judged by the person probe alone", file=sys.stderr)
            self.people = None
            return None

    def seen(self, features, people: np.ndarray | None = None) -> list[Seen] | None:
        """What the encoder sees in each grid (B, R, F): the concept table's word probabilities (from
        the ImageNet head) and P(person) (the person probe, mixed with the detectors' scores `people`
        where given: `detect_people`; None without a probe). None where the model has no concept
        table or head."""
        if self.concept_table is None:
            return None
        head = self.classifier()
        if head is None:
            return None
        probs = imagenet_probabilities(head, np.asarray(features, dtype=np.float32))
        words = self.concept_table.word_probabilities(probs)
        if self.person_head is None:
            return [Seen(w, None) for w in words]
        absent = self.person_head.absent(people)
        return [Seen(w, float(p), absent) for w, p in zip(words, self.person_head(probs, people))]

    def concepts(self, seen: list[Seen] | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The concept input of a grounded decoder (config.concept_tokens): (B, K) concept ids and
        probabilities."""
        if not self.config.concept_tokens:
            return None
        if seen is None or seen[0].person is None:
            raise ValueError("a grounded model needs its ImageNet head, concepts.json and person_head.npz")
        return top_concepts(np.stack([s.words for s in seen]), np.array([s.person for s in seen]),
                            self.config.concept_tokens)

    def agreement(self, hyps: list[Hypothesis], seen: Seen) -> list[dict]:
        """Each hypothesis checked against what the encoder sees (concepts.Agreement)."""
        return [self._checker().check([self.vocab.itos[t] for t in h.tokens], seen) for h in hyps]

    def _checker(self) -> Agreement:
        if not hasattr(self, "_agreement"):
            self._agreement = Agreement(self.concept_table)
        return self._agreement

    def _with_concept_captions(self, beams, seen, steps, features, options) -> list[list[Hypothesis]]:
        """Where every caption of the grid's beam claims something the encoder rules out (a person
        the probe does not see), the captions of the beam run on the concepts alone that claim
        nothing ruled out join the candidates: a plain true caption ("a pizza with cheese on a
        plate") can then win the rerank. Elsewhere the grid's captions stay, for they describe a
        scene better than a list of concepts does."""
        false = [all(c["unsupported"] for c in self.agreement(b, s)) for b, s in zip(beams, seen)]
        if not any(false):
            return beams
        bare = beam_search(steps, features[:, :0], options)
        clean = [[h for h, c in zip(hyps, self.agreement(hyps, s)) if not c["unsupported"]]  # no new falsehood
                 for hyps, s in zip(bare, seen)]
        return [_pooled([b], [c])[0] if f else b for b, c, f in zip(beams, clean, false)]

    def _mentioned_once(self) -> np.ndarray | None:
        """(V,) the words config.mention_once allows once a caption: the names of things
        (Agreement.named_once, with a concept table) and the words the training captions say at most
        once (vocab.once); built once per vocabulary; None when off."""
        if not self.config.mention_once:
            return None
        if getattr(self, "_once_for", None) is not self.vocab.stoi:
            once = np.zeros(len(self.vocab), dtype=bool)
            if self.concept_table is not None:
                once |= self._checker().named_once(self.vocab.stoi)
            once[[self.vocab.stoi[w] for w in self.vocab.once]] = True
            self._once_for, self._once = self.vocab.stoi, once
        return self._once

    def _fluency_bonus(self, hyps: list[Hypothesis]) -> np.ndarray:
        """config.fluency_weight * log P(well-formed) of each hypothesis (0s without a judge)."""
        if self.fluency is None or not self.config.fluency_weight or not hyps:
            return np.zeros(len(hyps), dtype=np.float32)
        p = self.fluency.score_ids([h.tokens for h in hyps])
        return self.config.fluency_weight * np.log(np.maximum(p, 1e-6))

    def _rerank(self, hyps: list[Hypothesis], seen: Seen | None, n_best: int, fluency: bool = False) -> list[Hypothesis]:
        """The beam's captions, those that claim nothing the encoder rules out first, then those
        that name what it is sure of (with `seen`): a plain true caption beats a fluent false one;
        then by score, plus the fluency judge's verdict when `fluency`."""
        checks = self.agreement(hyps, seen) if seen is not None else [{} for _ in hyps]
        bonus = self._fluency_bonus(hyps) if fluency else np.zeros(len(hyps))
        order = sorted(range(len(hyps)), key=lambda i: (len(checks[i].get("unsupported", ())),
                                                        len(checks[i].get("missed", ())),
                                                        -(hyps[i].score + bonus[i]), i))
        return [hyps[i] for i in order[:n_best]]

    def generation_options(self, n: int, beam_size: int = 3, n_best: int = 1, style: str | None = None,
                           max_length: int | None = None, guidance: "float | np.ndarray | None" = None,
                           seen: list[Seen] | None = None) -> GenerationOptions:
        """How `decode` decodes `n` images: the config's defaults and the per-word rules. A styled
        caption is contrasted with the default (factual) one (StyleGuidance) and kept off the style's
        stock phrases (aicrl/phrases.py); no caption loops over its content words (NoRepeats). With
        what the encoder sees (`seen`) and config.concept_bonus / absent_penalty, the words of likely
        concepts gain and people and dogs it rules out lose (WordBonus)."""
        styles = self.style_ids(style, n)
        styled = styles is not None and style not in (None, "", self.styles[0])
        guidance = self.config.guidance_for(style) if guidance is None else guidance
        guided = styled and bool(np.any(np.asarray(guidance) > 0))
        processors: list = [NoRepeats(self.content_words, self._mentioned_once())] if self.config.block_repeats else []
        phrases = self.phrases.for_style(style, self.vocab.stoi, len(self.vocab)) if styled and self.phrases else None
        if phrases is not None:
            processors.append(phrases)
        if guided:
            processors.append(StyleGuidance(guidance))
        if seen and (self.config.concept_bonus or self.config.absent_penalty):
            processors.append(WordBonus(self._checker().word_bonus(seen, self.vocab.stoi, self.config.concept_bonus,
                                                                  self.config.absent_penalty)))
        return GenerationOptions(self.vocab.start, self.vocab.end, max_length or self.config.max_length, beam_size,
                                 n_best, self.config.length_penalty, styles,
                                 np.zeros_like(styles) if guided else None, processors=processors)

    def decode(self, features, beam_size: int = 3, n_best: int = 1, style: str | None = None,
               max_length: int | None = None, guidance: float | None = None,
               variants: int = 1, seen: list[Seen] | None = None,
               people: np.ndarray | None = None) -> list[list[Hypothesis]]:
        """Beam search (greedy for beam_size 1) over grids `features` (B, R, F), numpy or torch.
        `variants` > 1: that many different captions per image, best first (see `_variants`). What
        the encoder sees is `seen`, else read from the grids and the detectors' scores `people`
        (`detect_people`; without them P(person) is the probe's alone)."""
        features = features.float().cpu().numpy() if hasattr(features, "detach") else np.asarray(features, np.float32)
        seen = seen if seen is not None else self.seen(features, people)
        options = self.generation_options(len(features), beam_size, n_best, style, max_length, guidance, seen)
        options.concepts = self.concepts(seen)
        steps = self.steps()
        if variants == 1 and beam_size == 1:
            return [[h] for h in greedy(steps, features, options)]
        styled = style not in (None, "", self.styles[0])
        judged = self.fluency is not None and bool(self.config.fluency_weight) and (variants > 1 or styled)
        beams = self._candidates(steps, features, options.replace(n_best=beam_size), seen, judged,
                                 style if styled else None, guidance)
        if variants == 1:
            return [b[:n_best] for b in beams]
        # different captions: every beam, then sampled ones; the best that differ win
        drawn = sample(steps, features, options.replace(temperature=0.8, top_p=0.9), n=4 * variants)
        return [_variants(b + d, variants, self._fluency_bonus(b + d) if judged else None)
                for b, d in zip(beams, drawn)]

    def _candidates(self, steps, features, options: GenerationOptions, seen: list[Seen] | None, judged: bool,
                    style: str | None, guidance: float | None) -> list[list[Hypothesis]]:
        """Each image's beam, best first: with the config's pools (the concepts' own captions where
        the grid's are false, a styled beam pushed more gently for the fluency judge), reranked by
        agreement with what the encoder sees and by the judge."""
        agree = bool(self.config.rerank_by_agreement and seen)
        gentler = list(self.config.fluency_pool) if judged and style is not None else []
        beams, *pools = self._guided_beams(steps, features, options, seen, style, guidance, gentler)
        if agree and self.config.concept_pool and options.concepts is not None:
            beams = self._with_concept_captions(beams, seen, steps, features, options)
        for more in pools:
            beams = _pooled(beams, more)
        if not (agree or judged):
            return beams
        return [self._rerank(b, s, len(b), judged) for b, s in zip(beams, seen if agree else [None] * len(beams))]

    def _guided_beams(self, steps, features, options: GenerationOptions, seen: list[Seen] | None,
                      style: str | None, guidance: float | None, fractions: list[float]) -> list[list[list[Hypothesis]]]:
        """The beams of `options`, then, for each of `fractions`, the beams of the same search with the
        style pushed that fraction as hard: all in one search over the images repeated, so that the
        decoder runs once per word for all of them (the same captions, in fewer and fuller decoder calls)."""
        if not fractions:
            return [beam_search(steps, features, options)]
        n, reps = len(features), 1 + len(fractions)
        weight = self.config.guidance_for(style) if guidance is None else guidance
        weights = np.repeat([weight, *(weight * f for f in fractions)], n).astype(np.float32)
        tiled = self.generation_options(n * reps, options.beam_size, options.n_best, style, options.max_length,
                                        weights, None if seen is None else list(seen) * reps)
        if options.concepts is not None:
            tiled.concepts = tuple(np.tile(c, (reps, 1)) for c in options.concepts)
        found = beam_search(steps, np.tile(features, (reps, 1, 1)), tiled)
        return [found[i * n:(i + 1) * n] for i in range(reps)]

    def caption(self, images: Sequence[ImageSource], beam_size: int = 3, n_best: int = 1,
                style: str | None = None, max_length: int | None = None, variants: int = 1) -> list[CaptionResult]:
        """Caption a batch of images (paths, bytes or PIL images). Raises ImageLoadError on a bad one.
        `variants`: that many different captions per image instead of the `n_best` beams."""
        if not 1 <= beam_size <= MAX_BEAM_SIZE:
            raise ValueError(f"beam_size must be between 1 and {MAX_BEAM_SIZE}")
        if not 1 <= variants <= MAX_VARIANTS:
            raise ValueError(f"variants must be between 1 and {MAX_VARIANTS}")
        t0 = time.perf_counter()
        images = [decode_image(i, max_side=IMAGE_SIZE) for i in images]  # once, for the encoder and the detectors
        features = self.encode(images)
        head = self.classifier()  # the tags come from the same features
        tags = tags_from_features(head, features) if head is not None else [[] for _ in images]
        seen = self.seen(features, self._detect(images))  # once: decoding and the check below both read it
        t1 = time.perf_counter()
        hyps = self.decode(features, beam_size, n_best, style, max_length, variants=variants, seen=seen)
        seen = seen or [None] * len(hyps)
        t2 = time.perf_counter()
        timing = {"encode": round((t1 - t0) * 1000 / len(images), 1),
                  "decode": round((t2 - t1) * 1000 / len(images), 1)}
        style = style or self.styles[0]
        results = []
        for image_hyps, image_tags, image_seen in zip(hyps, tags, seen):
            checks = self.agreement(image_hyps, image_seen) if image_seen else [{} for _ in image_hyps]
            captions = [Caption(self.vocab.decode(h.tokens), h.score, h.logprob, [self.vocab.itos[t] for t in h.tokens],
                                [[round(float(a), 4) for a in row[:GRID * GRID]] for row in h.attention], check)
                        for h, check in zip(image_hyps, checks)]
            results.append(CaptionResult(captions, style, dict(timing), image_tags))
        return results


def _pooled(beams: list[list[Hypothesis]], more: list[list[Hypothesis]]) -> list[list[Hypothesis]]:
    """Each image's candidates with another search's, without repeating a caption."""
    return [b + [h for h in m if all(h.tokens != k.tokens for k in b)] for b, m in zip(beams, more)]


def _variants(candidates: list[Hypothesis], k: int, bonus: np.ndarray | None = None) -> list[Hypothesis]:
    """The first candidate (the beam's best: what the caption is without variants), then the
    best-scoring others (score + `bonus`, the fluency judge's) whose words differ from every caption
    kept, up to `k`."""
    bonus = np.zeros(len(candidates)) if bonus is None else bonus
    rest = sorted(range(1, len(candidates)), key=lambda i: -(candidates[i].score + bonus[i]))
    chosen, seen = [], set()
    for h in candidates[:1] + [candidates[i] for i in rest]:
        words = frozenset(h.tokens)
        if h.tokens and words not in seen:
            chosen.append(h)
            seen.add(words)
        if len(chosen) == k:
            break
    return chosen
