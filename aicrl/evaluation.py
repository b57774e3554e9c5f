"""Caption metrics: the coco-caption toolkit (pycocoevalcap) for corpora, NLTK BLEU for one caption.

All scores are on the 0-1 scale.
"""
from __future__ import annotations

import logging
import shutil
from importlib import util
from pathlib import Path
from typing import Any, Callable

from .data.datasets import CaptionData
from .data.vocab import content_words, tokenize, trigram_shares

log = logging.getLogger(__name__)

_BLEU_WEIGHTS = [(1, 0, 0, 0), (0.5, 0.5, 0, 0), (1 / 3, 1 / 3, 1 / 3, 0), (0.25, 0.25, 0.25, 0.25)]


def _have_java() -> bool:
    return shutil.which("java") is not None


def _spice_models_present() -> bool:
    spec = util.find_spec("pycocoevalcap")
    lib = Path(spec.origin).parent / "spice" / "lib" if spec and spec.origin else None
    return bool(lib and any(lib.glob("stanford-corenlp-3.6.0*.jar")))


def coco_scores(predictions: dict[str, str], references: dict[str, list[str]],
                metrics: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider", "spice")) -> dict[str, float]:
    """Corpus metrics of the coco-caption toolkit over images that have both a prediction and references.

    Tokenises with its PTB tokenizer (Java) where Java is present, else with ours. METEOR needs Java;
    SPICE needs Java and the Stanford CoreNLP models (a download): metrics that cannot run are skipped
    with a log line, never faked.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = [i for i in predictions if i in references]
    if _have_java():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        res = tok.tokenize({i: [{"caption": predictions[i]}] for i in ids})
        gts = tok.tokenize({i: [{"caption": r} for r in references[i]] for i in ids})
    else:
        res = {i: [" ".join(tokenize(predictions[i]))] for i in ids}
        gts = {i: [" ".join(tokenize(r)) for r in references[i]] for i in ids}
    out: dict[str, float] = {}
    if "bleu" in metrics:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out |= {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    if "meteor" in metrics:
        if _have_java():
            from pycocoevalcap.meteor.meteor import Meteor

            out["METEOR"] = float(Meteor().compute_score(gts, res)[0])  # its Java process ends in __del__
        else:
            log.warning("METEOR skipped: it needs Java")
    if "rouge" in metrics:
        out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "cider" in metrics:
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if "spice" in metrics:
        if _have_java() and _spice_models_present():
            from pycocoevalcap.spice.spice import Spice

            out["SPICE"] = float(Spice().compute_score(gts, res)[0])
        else:
            log.info("SPICE skipped: it needs the Stanford CoreNLP 3.6.0 models, a download")
    return out


def quick_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """BLEU-4 and CIDEr without Java (our tokenizer): fast enough for every epoch's dev check."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = [i for i in predictions if i in references]
    res = {i: [" ".join(tokenize(predictions[i])) or "<empty>"] for i in ids}
    gts = {i: [" ".join(tokenize(r)) for r in references[i]] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"BLEU-4": float(bleu[3]), "CIDEr": float(Cider().compute_score(gts, res)[0])}


def nltk_corpus_bleu(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """NLTK corpus BLEU-1..4 on our tokens: the kind of number the paper reports."""
    from nltk.translate.bleu_score import corpus_bleu  # nltk takes seconds to import: only when used

    ids = [i for i in predictions if i in references]
    hyps = [tokenize(predictions[i]) for i in ids]
    refs = [[tokenize(r) for r in references[i]] for i in ids]
    return {f"BLEU-{n + 1}": float(corpus_bleu(refs, hyps, weights=w)) for n, w in enumerate(_BLEU_WEIGHTS)}


def sentence_bleu(candidate: str, references: list[str]) -> dict[str, float]:
    """BLEU-1..4 of one caption against one or more references (smoothed, as short texts need),
    and the combined score (BLEU-4, the geometric mean of the 1- to 4-gram precisions)."""
    from nltk.translate.bleu_score import SmoothingFunction
    from nltk.translate.bleu_score import sentence_bleu as _nltk_sentence_bleu

    refs = [tokenize(r) for r in references if tokenize(r)]
    hyp = tokenize(candidate)
    if not refs:
        raise ValueError("give at least one non-empty reference caption")
    smooth = SmoothingFunction().method1
    scores = {f"BLEU-{n + 1}": float(_nltk_sentence_bleu(refs, hyp, weights=w, smoothing_function=smooth))
              if hyp else 0.0 for n, w in enumerate(_BLEU_WEIGHTS)}
    scores["BLEU"] = scores["BLEU-4"]
    return scores


# ----------------------------------------------------------------------------- styles

class StyleClassifier:
    """Which style is a caption written in? Logistic regression on word 1-2-gram TF-IDF (scikit-learn),
    trained on human captions; used to check that styled captions really come out in their style."""

    def __init__(self):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.pipeline = make_pipeline(
            TfidfVectorizer(tokenizer=tokenize, token_pattern=None, ngram_range=(1, 2), min_df=2,
                            sublinear_tf=True),
            LogisticRegression(max_iter=2000, C=4.0, class_weight="balanced"))

    def fit(self, captions: list[str], styles: list[str]) -> "StyleClassifier":
        self.pipeline.fit(captions, styles)
        return self

    def predict(self, captions: list[str]) -> list[str]:
        return list(self.pipeline.predict(captions))

    def accuracy(self, captions: list[str], styles: list[str]) -> dict[str, float]:
        """Share classified correctly, per style and overall."""
        predicted = self.predict(captions)
        out = {}
        for style in sorted(set(styles)):
            pairs = [(p, s) for p, s in zip(predicted, styles) if s == style]
            out[style] = sum(p == s for p, s in pairs) / len(pairs)
        out["overall"] = sum(p == s for p, s in zip(predicted, styles)) / len(styles)
        return out


def fit_style_classifier(factual: CaptionData, styled: CaptionData) -> StyleClassifier:
    """The judge of style accuracy, trained on the training split's human captions of every style
    (`factual`: e.g. Flickr8k, `styled`: e.g. FlickrStyle7k)."""
    captions = styled.select("train") + factual.select("train")
    return StyleClassifier().fit([r.caption for r in captions], [r.style for r in captions])


def content_overlap(predictions: dict[str, str], factual_refs: dict[str, list[str]]) -> float:
    """Share of captions that share at least one content word with the image's factual references:
    a style that ignores the image scores low here."""
    ids = [i for i in predictions if i in factual_refs]
    hits = sum(bool(content_words(predictions[i]) & set().union(*map(content_words, factual_refs[i])))
               for i in ids)
    return hits / max(len(ids), 1)


def diversity(predictions: dict[str, str]) -> dict:
    """How varied the captions are: distinct words and captions, mean length, and the word trigram
    found in the most captions (a model that glues one stock phrase to every photo shows up here)."""
    captions = [tokenize(c) for c in predictions.values()]
    shares = trigram_shares(predictions.values())
    top, share = max(shares.items(), key=lambda kv: (kv[1], kv[0]), default=("", 0.0))
    return {"distinct_words": len({w for c in captions for w in c}),
            "distinct_captions": len({tuple(c) for c in captions}),
            "mean_length": round(sum(map(len, captions)) / max(len(captions), 1), 2),
            "top_trigram": top, "top_trigram_share": round(share, 4)}


DETERMINERS = frozenset("a an the his her their its".split())
# Words that can stand between two noun phrases ("a dog with a ball", "a man throws a frisbee"):
# prepositions, conjunctions, verbs. Verbs are told by form (-s, -ed, -ing) or listed when irregular.
_JOINS = frozenset("of in on at to into onto over under through from with without by for as near next "
                   "and or but while like than is are was were be has have had see sees saw hit hits "
                   "behind beside between across along around past toward towards against above below "
                   "beneath inside outside underneath upon among about after before".split())


def grammar_errors(caption: str) -> list[str]:
    """The broken joins a decoder makes when it glues phrases together: a word said twice in a row
    ("the the"), two determiners in a row ("a the dog") or around a word that cannot join two noun
    phrases ("an ugly a yellow building"). A simple checker: it finds these, not grammar at large."""
    words = tokenize(caption)
    found = []
    for i, w in enumerate(words[:-1]):
        nxt = words[i + 1]
        if nxt == w:
            found.append(f"doubled word: {w} {nxt}")
        elif w in DETERMINERS and nxt in DETERMINERS:
            found.append(f"two determiners: {w} {nxt}")
        elif (i + 2 < len(words) and w in DETERMINERS and words[i + 2] in DETERMINERS and nxt not in _JOINS
              and not nxt.endswith(("s", "ed", "ing"))):
            found.append(f"broken join: {w} {nxt} {words[i + 2]}")
    return found


def grammar_error_rate(predictions: dict[str, str]) -> float:
    """Share of captions with at least one `grammar_errors` finding."""
    return round(sum(bool(grammar_errors(c)) for c in predictions.values()) / max(len(predictions), 1), 4)


# ----------------------------------------------------------------------------- whole splits

def fluency_scores(captioner, predictions: dict[str, str]) -> dict[str, float]:
    """The model folder's fluency judge on the captions (aicrl/fluency.py): mean P(well-formed) and
    the share it judges well-formed (P >= 0.5); {} when the folder has no judge."""
    if captioner.fluency is None or not predictions:
        return {}
    p = captioner.fluency.score(list(predictions.values()), captioner.vocab.stoi, captioner.vocab.unk)
    return {"mean": round(float(p.mean()), 4), "fluent": round(float((p >= 0.5).mean()), 4)}


def caption_images(captioner, names: list[str], features_of: Callable[[list[str]], Any],
                   beam_size: int = 3, style: str | None = None, batch_size: int = 50,
                   progress: bool = True, people_of: Callable[[list[str]], Any] | None = None) -> dict[str, str]:
    """Caption `names` batch by batch; `features_of(chunk)` gives their (B, regions, dim) grids
    (numpy or torch), `people_of(chunk)` the person detectors' scores (`people_source`), as
    `Captioner.caption` has them from the photos."""
    from tqdm import tqdm

    out = {}
    for i in tqdm(range(0, len(names), batch_size), desc=f"captioning ({style or 'factual'})",
                  unit="batch", disable=not progress):
        chunk = names[i:i + batch_size]
        people = people_of(chunk) if people_of else None
        for name, hyps in zip(chunk, captioner.decode(features_of(chunk), beam_size, 1, style, people=people)):
            out[name] = captioner.vocab.decode(hyps[0].tokens)
    return out


def features_source(captioner, image_dir: str | Path,
                    cache_dir: str | Path | None = None) -> Callable[[list[str]], Any]:
    """Grids from a feature cache of the same encoder when given (a cache of what enters the
    encoder's last stage goes through the model's own last stage, fine-tuned or not), else from the
    images."""
    if cache_dir:
        from .data.features import LAST_STAGE_INPUT, FeatureCache

        cache = FeatureCache(cache_dir)
        if cache.encoder != captioner.config.encoder:
            raise ValueError(f"cache {cache_dir} holds {cache.encoder} features, the model uses "
                             f"{captioner.config.encoder}")
        if cache.mirrored:  # its photos are flipped: their references' left and right are wrong
            raise ValueError(f"cache {cache_dir} holds mirrored photos, made for training: evaluate on the "
                             "cache made without --mirror")
        if cache.stage == LAST_STAGE_INPUT and captioner.backend == "torch":
            import torch

            def through_last_stage(chunk: list[str]):
                with torch.inference_mode():
                    return captioner.encoder.last_stage(cache.get(chunk).to(captioner.device).float())
            return through_last_stage
        if cache.stage != LAST_STAGE_INPUT and not captioner.encoder_finetuned:
            return cache.get
    return lambda chunk: captioner.encode([Path(image_dir) / n for n in chunk])


def people_source(captioner, image_dir: str | Path) -> Callable[[list[str]], Any] | None:
    """The person detectors' scores of photos by name (from the image files: a feature cache has
    no pixels), or None where the model has no detectors."""
    if not captioner.sees_people:
        return None
    return lambda chunk: captioner.detect_people([Path(image_dir) / n for n in chunk])


def evaluate_factual(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    return {"coco_caption": coco_scores(predictions, references),
            "nltk_corpus_bleu": nltk_corpus_bleu(predictions, references), "images": len(predictions),
            "diversity": diversity(predictions), "grammar_error_rate": grammar_error_rate(predictions)}


def evaluate_style(predictions: dict[str, str], styled_refs: dict[str, list[str]],
                   factual_refs: dict[str, list[str]], style: str, classifier: StyleClassifier) -> dict:
    """Styled captions against styled references, their style accuracy and their content overlap."""
    scores = coco_scores(predictions, styled_refs, metrics=("bleu", "meteor", "cider"))
    kept = {k: scores[k] for k in ("BLEU-1", "BLEU-3", "METEOR", "CIDEr") if k in scores}
    predicted = classifier.predict(list(predictions.values()))
    return {"style": style, "images": len(predictions), **kept,
            "style_accuracy": sum(p == style for p in predicted) / max(len(predicted), 1),
            "content_overlap": content_overlap(predictions, factual_refs), "diversity": diversity(predictions),
            "grammar_error_rate": grammar_error_rate(predictions)}
