"""The grounding stage: teach a trained captioner to say what the encoder sees.

A decoder trained on Flickr8k alone knows Flickr8k's world (people and dogs) and writes it into
every photo. This stage starts from such a model (`init_from`) and
  1. widens its vocabulary with the words of caption text from outside Flickr8k (COCO captions,
     text only) and of the concept table (new words start from the mean of the known ones), and
     records the words all that factual text says at most once a caption (data/vocab.py said_once);
  2. fits the person probe (model/concepts.py PersonHead): ImageNet has no person class;
  3. gives the decoder concept regions (config.concept_tokens): the photo's most likely concepts
     (ImageNet head -> caption words, concepts.json; and the person probe) join the grid;
  4. trains it by cross-entropy on three kinds of batches, shuffled together:
     - Flickr8k captions (factual and styled) with their grid and their concepts,
     - the same without the grid (`grid_dropout`): concepts alone must carry the content,
     - caption text with the concepts it names and no grid (Feng et al. 2019): how people write
       about zebras and broccoli, learnt from the concepts a tagger would give (`text_repeats`
       draws it more than once an epoch: 24k sentences against 44k Flickr8k captions);
  5. keeps the epoch with the best Flickr8k dev CIDEr, checkpointing every epoch (resumable).
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data.datasets import FACTUAL, load_dataset, read_caption_text, read_style_jsonl
from .data.features import FeatureCache
from .data.vocab import Vocabulary, said_once, tokenize
from .evaluation import caption_images, diversity, quick_scores
from .model.captioner import Captioner
from .model.concepts import (PERSON_WORDS, ConceptTable, PersonHead, SentenceConcepts, concept_names,
                             imagenet_probabilities, log_odds, top_concepts)
from .model.decoder import build_decoder, caption_loss
from .training import pad

log = logging.getLogger(__name__)


def _option(default, text: str):
    """A setting with its --help text (`aicrl ground` makes one flag per field)."""
    return field(default=default, metadata={"help": text})


REQUIRED = object()  # a setting without a default: a required flag


@dataclass
class GroundingConfig:
    init_from: str = _option(REQUIRED, "the trained model folder to start from (its grids must be in --features)")
    data_dir: str = _option(REQUIRED, "Flickr8k folder (e.g. ../shared/data/flickr8k)")
    features: str = _option(REQUIRED, "feature cache of the Flickr8k photos made by --init-from's own encoder")
    concepts: str = _option(REQUIRED, "concepts.json: ImageNet classes as caption words (python -m "
                                      "aicrl.model.build_concepts)")
    out: str = _option(REQUIRED, "output folder: checkpoint.pt, log.jsonl and the best epoch as OUT/best")
    style_file: str = _option("", "FlickrStyle jsonl, so the model keeps its styles")
    text_file: str = _option("", "caption text without photos, one {\"caption\": ...} per line (COCO captions)")
    concept_tokens: int = _option(6, "concept regions per photo (one of them is the person probe)")
    min_freq: int = _option(5, "a word of the text joins the vocabulary when seen this often")
    grid_dropout: float = _option(0.25, "share of photo batches shown without their grid (concepts alone)")
    text_repeats: int = _option(1, "how many times an epoch the caption text is drawn (more: a larger share of "
                                   "text batches, for writing from the concepts alone)")
    person_from_caption: bool = _option(False, "the person slot of a photo's concepts says whether the caption "
                                               "names a person (as for caption text), not what the probe sees: the "
                                               "decoder learns to follow it, and writes no one where P(person) is low")
    epochs: int = _option(3, "epochs of cross-entropy training")
    lr: float = _option(2e-4, "Adam learning rate")
    concept_lr: float = _option(4e-3, "learning rate of the new concept embeddings (each is seen in few batches)")
    batch_size: int = _option(32, "captions per batch")
    max_words: int = _option(25, "training captions are cut to this many words")
    dev_images: int = _option(0, "score only the first N dev images after each epoch (0: all)")
    eval_beam: int = _option(3, "beam width of the dev evaluation")
    max_batches: int = _option(0, "at most this many batches an epoch (0: all), drawn afresh each epoch")
    threads: int = _option(0, "torch threads (0: torch's default; 1 is faster on a machine busy with other work)")
    seed: int = _option(0, "random seed")


def fit_person_head(imagenet_probs: np.ndarray, captions: list[list[str]], bias: float = -2.0,
                    l2: float = 1e-4, steps: int = 300) -> tuple[PersonHead, float]:
    """Logistic regression on ImageNet class probabilities (N, 1000) with a fixed bias (see
    PersonHead): a person is in the photo when most of its captions name one. Weight decay `l2` keeps
    classes Flickr8k rarely shows near 0. On Flickr8k dev: 84% right; on coco_mini's 80 everyday
    photos 78% (a probe on the grid: 94% and 50%). Returns the head and its training accuracy."""
    labels = person_labels(captions).astype(np.float32)
    x, y = torch.tensor(imagenet_probs, dtype=torch.float32), torch.from_numpy(labels)
    weight = torch.zeros(x.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight], lr=0.5)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y) + l2 * weight.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head = PersonHead(weight.detach().numpy(), bias)
    return head, float(((head(imagenet_probs) >= 0.5) == labels.astype(bool)).mean())


def person_labels(captions: list[list[str]]) -> np.ndarray:
    """(N,) bool: a person is in the photo when most of its captions name one."""
    return np.array([sum(any(w in PERSON_WORDS for w in tokenize(c)) for c in caps) * 2 > len(caps)
                     for caps in captions])


def fit_person_mix(probe: np.ndarray, detections: np.ndarray, captions: list[list[str]]) -> tuple[np.ndarray, float]:
    """Logistic regression of "a person is in the photo" on the log-odds of the probe (B,) and of
    the detectors (B, 2) (model/people.py) -> PersonHead.mix (4,) and its balanced training accuracy.
    The classes are weighted evenly: Flickr8k's 74% people is not the share in everyday photos, and a
    bias fitted to it would put people where the detectors see none. On Flickr8k dev the mix finds
    people as the probe does (98% of them at P >= 0.25); on coco_mini's everyday photos it lets a
    person into 35% of the photos without one, where the probe alone let one into 48%."""
    from sklearn.linear_model import LogisticRegression

    labels = person_labels(captions)
    x = np.concatenate([log_odds(probe)[:, None], log_odds(detections)], 1)
    fit = LogisticRegression(class_weight="balanced").fit(x, labels)
    mix = np.append(fit.coef_[0], fit.intercept_[0]).astype(np.float32)
    predicted = fit.predict(x)
    accuracy = np.mean([np.mean(predicted[labels == k] == k) for k in (False, True)])
    return mix, float(accuracy)


def widen(model: Captioner, words: list[str], table: ConceptTable, k: int, once: list[str] | None = None) -> Captioner:
    """The same model with `words` appended to its vocabulary (and `once` its words said at most once
    a caption, else the model's) and `k` concept regions; every weight with a vocabulary axis gets
    new rows, the mean of the old ones (a new word starts as an average word), and the decoder gains
    its concept embeddings."""
    new_words = [w for w in dict.fromkeys(words) if w not in model.vocab.stoi]
    vocab = Vocabulary([*model.vocab.itos, *new_words], model.vocab.once if once is None else once)
    old_v = len(model.vocab)
    cfg = type(model.config)(**asdict(model.config))
    cfg.vocab_size, cfg.concept_tokens, cfg.num_concepts = len(vocab), k, len(concept_names(table))
    decoder = build_decoder(cfg)
    state = decoder.state_dict()
    for name, old in model.decoder.state_dict().items():
        if old.shape == state[name].shape:
            state[name] = old
            continue
        axis = [i for i, (a, b) in enumerate(zip(old.shape, state[name].shape)) if a != b][0]
        assert old.shape[axis] == old_v, name
        mean = old.float().mean(axis, keepdim=True)
        state[name] = torch.cat([old, mean.expand_as(state[name].narrow(axis, 0, len(new_words)))], axis)
    decoder.load_state_dict(state)
    widened = Captioner(cfg, vocab, decoder, model._encoder)
    widened.encoder_finetuned, widened.phrases = model.encoder_finetuned, model.phrases
    widened.concept_table = table
    return widened


def init_concepts(decoder, head: tuple[np.ndarray, np.ndarray] | None, table: ConceptTable) -> None:
    """Each concept's region starts as its ImageNet classes' direction in feature space (the mean of
    their rows of the head, scaled like a normalised grid region): a zebra region points where zebra
    grids point. The person (no class) keeps its random start."""
    if head is None:
        return
    weight = head[0]
    with torch.no_grad():
        for i, word in enumerate(table.vocabulary, 1):
            rows = weight[[c for c, w in enumerate(table.words) if w == word]].mean(0)
            rows = (rows - rows.mean()) / (rows.std() + 1e-6)
            decoder.concept_embed.weight[i] = torch.from_numpy(rows)


class Batches:
    """The stage's training batches: (kind, rows) with kind "photo", "concepts only" or "text"."""

    def __init__(self, cfg: GroundingConfig, photo_rows: list, text_rows: list):
        self.cfg, self.photo_rows, self.text_rows = cfg, photo_rows, text_rows

    def epoch(self, epoch: int) -> list[tuple[str, list]]:
        rng = np.random.default_rng(self.cfg.seed * 1000 + epoch)
        out = []
        for kind, rows in (("photo", self.photo_rows), ("text", self.text_rows * self.cfg.text_repeats)):
            order = rng.permutation(len(rows))
            for i in range(0, len(order), self.cfg.batch_size):
                batch = [rows[j] for j in order[i:i + self.cfg.batch_size]]
                if kind == "photo" and rng.random() < self.cfg.grid_dropout:
                    out.append(("concepts only", batch))
                else:
                    out.append((kind, batch))
        return [out[i] for i in rng.permutation(len(out))]


def text_concepts(found: list[list[int]], person: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The concept input for captions without photos, shaped like `top_concepts` gives for photos:
    the person slot first, then the named concepts, each with a tagger-like confidence; a few are
    dropped, as a tagger misses things."""
    ids, probs = np.zeros((len(found), k), np.int64), np.zeros((len(found), k), np.float32)
    ids[:, 0], probs[:, 0] = person, person_slot(np.array([person in c for c in found]), rng)
    for r, concepts in enumerate(found):
        named = [c for c in concepts if c != person and rng.random() > 0.15][:k - 1]
        ids[r, 1:1 + len(named)] = named
        probs[r, 1:1 + len(named)] = np.sort(rng.uniform(0.3, 1.0, len(named)))[::-1]
    return ids, probs


def person_slot(named: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N,) the person slot's probability for captions that name a person (`named`) or not: clearly on
    or clearly off, as a tagger that is sure would give it."""
    return np.where(named, rng.uniform(0.6, 1.0, len(named)), rng.uniform(0.0, 0.25, len(named))).astype(np.float32)


@dataclass
class GroundingRun:
    """What the stage trains on, prepared once: the widened model, the grids and concepts of the
    Flickr8k photos in memory, and the batches."""
    cfg: GroundingConfig
    model: Captioner
    grids: dict[str, np.ndarray]  # image -> (regions, dim) float16
    concepts_of: dict[str, tuple[np.ndarray, np.ndarray]]  # training image -> (K ids, K probabilities)
    style_id: dict[str, int]
    batches: Batches
    dev_images: list[str]
    dev_refs: dict[str, list[str]]
    rng: np.random.Generator

    def loss(self, kind: str, rows: list) -> torch.Tensor:
        """Cross-entropy of one batch: photo rows (image, style, caption) with or without their grid,
        or text rows (concept ids, caption) without a photo."""
        cfg, vocab, decoder = self.cfg, self.model.vocab, self.model.decoder
        no_grid = torch.zeros(len(rows), 0, self.model.config.feature_dim)
        if kind == "text":
            ids, probs = text_concepts([r[0] for r in rows], self.model.config.num_concepts, cfg.concept_tokens,
                                       self.rng)
            feats, styles, captions = no_grid, torch.zeros(len(rows), dtype=torch.long), [r[1] for r in rows]
        else:
            images = [r[0] for r in rows]
            ids, probs = map(np.stack, zip(*(self.concepts_of[n] for n in images)))
            feats = torch.from_numpy(np.stack([self.grids[n] for n in images])).float() if kind == "photo" else no_grid
            styles, captions = torch.tensor([self.style_id[r[1]] for r in rows]), [r[2] for r in rows]
            if cfg.person_from_caption:
                probs = probs.copy()
                probs[:, 0] = person_slot(np.array([any(w in PERSON_WORDS for w in tokenize(c)) for c in captions]),
                                          self.rng)
        tokens = pad([vocab.encode(c, cfg.max_words) for c in captions], vocab.pad)
        logits, alphas = decoder(feats, tokens, styles if decoder.style_embed is not None else None,
                                 (torch.from_numpy(ids), torch.from_numpy(probs)))
        return caption_loss(logits, alphas, tokens[:, 1:], vocab.pad, attention_penalty=0.0)

    def evaluate_dev(self) -> dict:
        """Dev BLEU-4 and CIDEr of beam search, and how many distinct words and captions it wrote."""
        self.model.decoder.eval()
        preds = caption_images(self.model, self.dev_images,
                               lambda chunk: np.stack([self.grids[n] for n in chunk]).astype(np.float32),
                               self.cfg.eval_beam, batch_size=100, progress=False)
        varied = diversity(preds)
        return quick_scores(preds, self.dev_refs) | {"words": varied["distinct_words"],
                                                      "captions": varied["distinct_captions"]}


def prepare(cfg: GroundingConfig) -> GroundingRun:
    """Steps 1-3 of the module docstring, and the batches of step 4."""
    table = ConceptTable.read(cfg.concepts)
    data = load_dataset("flickr8k", cfg.data_dir)
    text = read_caption_text(cfg.text_file) if cfg.text_file else []
    counts = Counter(w for c in text for w in tokenize(c))
    new_words = sorted((w for w, n in counts.items() if n >= cfg.min_freq), key=lambda w: (-counts[w], w))
    new_words += [w for name in concept_names(table) for w in name.split()]
    start = Captioner.from_pretrained(cfg.init_from, backend="torch").to("cpu")
    once = said_once([r.caption for r in data.select("train")] + text)  # of all the factual text it learns
    model = widen(start, new_words, table, cfg.concept_tokens, once)
    # From a grounded model the stage trains on: its concepts' embeddings, its person head (with the
    # detectors' mix) and its detectors stay, and its fluency judge where the words keep their ids.
    grounded = bool(start.config.concept_tokens)
    if grounded:
        model.people = start.people
        model.fluency = start.fluency if len(model.vocab) == len(start.vocab) else None

    train_images, dev_images = data.images("train"), data.images("dev")[: cfg.dev_images or None]
    grids = dict(zip(train_images + dev_images, FeatureCache(cfg.features).get(train_images + dev_images).numpy()))
    head = model.classifier()
    probs = np.concatenate([imagenet_probabilities(head, np.stack([grids[n] for n in train_images[i:i + 500]]))
                            for i in range(0, len(train_images), 500)])
    refs = data.references("train")
    if grounded:
        model.person_head = start.person_head
    else:
        model.person_head, accuracy = fit_person_head(probs, [refs[n] for n in train_images])
        log.info("person probe: %.3f training accuracy", accuracy)
        init_concepts(model.decoder, head, table)
    ids, weights = top_concepts(table.word_probabilities(probs), model.person_head(probs), cfg.concept_tokens)

    style_id = {s: i for i, s in enumerate(model.styles)}
    photo_rows = [(r.image, FACTUAL, r.caption) for r in data.select("train")]
    if cfg.style_file:
        styled = read_style_jsonl(cfg.style_file, data.image_dir)
        photo_rows += [(r.image, r.style, r.caption) for r in styled.select("train") if r.style in style_id]
    sentence = SentenceConcepts(table)
    text_rows = [(sentence(tokenize(c)), c) for c in text]
    return GroundingRun(cfg, model, grids, {n: (ids[i], weights[i]) for i, n in enumerate(train_images)}, style_id,
                        Batches(cfg, photo_rows, text_rows), dev_images, data.references("dev"),
                        np.random.default_rng(cfg.seed))


def ground(cfg: GroundingConfig) -> dict:
    """The stage, top to bottom: prepare, then epochs of [train, evaluate on dev, keep the best,
    checkpoint]. Rerun after a kill: it continues after the last finished epoch."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # "dataset" and "stage" as training.py's settings have them: the model card reads the dataset
    (out / "train_config.json").write_text(json.dumps({"stage": "grounding", "dataset": "flickr8k"} | asdict(cfg),
                                                      indent=2) + "\n")
    run = prepare(cfg)
    decoder = run.model.decoder
    rest = [p for name, p in decoder.named_parameters() if not name.startswith("concept_embed")]
    optimizer = torch.optim.Adam([{"params": rest}, {"params": decoder.concept_embed.parameters(), "lr": cfg.concept_lr}],
                                 lr=cfg.lr)
    checkpoint, history = out / "checkpoint.pt", []
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        decoder.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history, run.rng = json.loads(saved["history"]), np.random.default_rng(cfg.seed + saved["epoch"])
    best = max((h["CIDEr"] for h in history), default=-1.0)
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        started, losses = time.time(), []
        decoder.train()
        for kind, rows in tqdm(run.batches.epoch(epoch)[: cfg.max_batches or None], desc=f"grounding epoch {epoch}",
                               mininterval=30):
            loss = run.loss(kind, rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
            optimizer.step()
            losses.append(loss.item())
        row = {"epoch": epoch, "loss": round(float(np.mean(losses)), 4), **run.evaluate_dev(),
               "seconds": round(time.time() - started)}
        history.append(row)
        print(json.dumps(row), flush=True)
        if row["CIDEr"] > best:
            best = row["CIDEr"]
            run.model.save_pretrained(out / "best", metrics={"dev": row, "epoch": epoch})
        torch.save({"model": decoder.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "history": json.dumps(history)}, checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)  # a kill never leaves half a checkpoint
        (out / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return {"history": history, "best_CIDEr": best}
