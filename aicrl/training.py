"""The training loop on cached encoder features, with two objectives.

- cross-entropy: maximum likelihood with teacher forcing (the paper's training);
- self-critical: REINFORCE on CIDEr-D (Rennie et al. 2017) with the "new SCST" baseline of Luo 2020,
  the mean reward of the image's other samples; usually started from a cross-entropy model
  (`--init-from`). See self_critical.py and rewards.py.

Reads top to bottom: settings -> `prepare` (data, vocabulary, features, model) -> optimiser ->
(`load_checkpoint`) -> epochs of [`run_epoch`, `evaluate_dev`, LR schedule, `save_checkpoint`,
early stopping] -> the best epoch as a model folder.

Runs unchanged under `torchrun --nproc_per_node=N aicrl train ...` (DistributedDataParallel; gloo on
CPU, nccl on GPU): each process trains on its share of every epoch's batches, rank 0 evaluates and
writes files.

Files in the output folder:
    checkpoint.pt   the latest epoch (model, optimiser, schedule, RNG, history): --resume continues here
    best/           the best epoch so far as a model folder (Captioner.save_pretrained)
    log.jsonl       one line per epoch: loss, dev metrics, learning rate, seconds
    curves.png      the same as a picture
    train_config.json  the resolved settings of this run
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .config import CaptionerConfig
from .data.datasets import FACTUAL, CaptionData, load_dataset, read_style_jsonl
from .data.features import LAST_STAGE_INPUT, FeatureCache, FeatureRows
from .data.vocab import MIRROR_SWAPS, Vocabulary, tokenize
from .devices import autocast, autocast_dtype, data_parallel, distributed_backend, grad_scaler, resolve_device
from .evaluation import caption_images, diversity, quick_scores
from .model.captioner import Captioner
from .model.decoder import build_decoder, caption_loss
from .model.encoders import ENCODERS
from .model.folder import ModelFolder
from .rewards import CiderD
from .self_critical import sample, self_critical_loss

log = logging.getLogger(__name__)
MIRRORED = "|mirrored"  # the reward's key for a training image seen mirrored


@dataclass
class TrainConfig:
    # data
    dataset: str = "flickr8k"
    data_dir: str = ""
    features: str = ""  # feature cache folder (aicrl extract-features)
    mirrored_features: str = ""  # the same images flipped left to right (extract-features --mirror)
    style_file: str = ""  # optional jsonl of styled captions (image, split, style, caption)
    style_repeat: int = 1  # how many times each styled caption is seen per epoch
    train_images: int = 0  # use only the first N training images (0 = all): for quick searches
    dev_images: int = 0  # evaluate on the first N dev images (0 = all)
    min_freq: int = 5
    max_words: int = 25  # training captions are cut to this many words
    # model
    decoder: str = "show-attend-tell"  # show-attend-tell or up-down
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    style_dim: int = 64
    dropout: float = 0.5
    init_from: str = ""  # start from this model folder (its vocabulary, styles and weights)
    # objective
    objective: str = "cross-entropy"  # cross-entropy or self-critical (CIDEr-D reward)
    scst_samples: int = 5  # captions sampled per image (self-critical)
    scst_max_words: int = 20  # longest sampled caption (self-critical)
    scst_style_ce: float = 1.0  # weight of a cross-entropy batch of styled captions per self-critical step
    scst_ce_all: bool = False  # draw that cross-entropy batch from all captions, factual too (keeps the vocabulary)
    # optimisation
    optimizer: str = "adam"  # adam or sgd (momentum 0.9)
    lr: float = 4e-4
    batch_size: int = 64  # captions (cross-entropy) or images (self-critical) per step
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    label_smoothing: float = 0.0
    attention_penalty: float = 1.0
    lr_decay: float = 0.5  # multiply the LR by this when the dev metric stops improving
    lr_patience: int = 0  # epochs without improvement before decaying
    epochs: int = 10
    early_stop: int = 3  # stop after this many epochs without improvement
    metric: str = "CIDEr"  # dev metric for selection: CIDEr or BLEU-4
    eval_beam: int = 3
    precision: str = "auto"  # autocast for the decoder: auto / bf16 / fp16 / fp32
    device: str = "auto"  # auto (cuda, mps, cpu) / cpu / cuda / mps; cuda:LOCAL_RANK under torchrun
    features_in_memory: bool = False  # copy the training features into RAM instead of reading each batch
    max_steps: int = 0  # stop after this many optimiser steps (0 = no limit): smoke runs, benchmarks
    seed: int = 0
    out: str = "runs/default"
    finetune_encoder: bool = False  # train the encoder's last stage (on a last-stage-input cache)
    encoder_lr: float = 1e-4
    show_progress: bool = True


# ----------------------------------------------------------------------------- data

def load_training_data(cfg: TrainConfig) -> CaptionData:
    data = load_dataset(cfg.dataset, cfg.data_dir)
    if cfg.style_file:
        styled = read_style_jsonl(cfg.style_file, data.image_dir)
        for _ in range(max(cfg.style_repeat, 1)):
            data.extend(CaptionData(data.image_dir, [r for r in styled.records if r.split == "train"]))
        # styled dev captions are kept apart for style evaluation, never trained on
        data.extend(CaptionData(data.image_dir, [r for r in styled.records if r.split != "train"]))
    return data


def _first(images: list[str], n: int) -> list[str]:
    return images[:n] if n else images


def make_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then sort by length inside pools of 50 batches so a batch pads little."""
    order = rng.permutation(len(lengths))
    pool = batch_size * 50
    batches = []
    for i in range(0, len(order), pool):
        chunk = sorted(order[i:i + pool], key=lambda j: lengths[j])
        batches += [np.array(chunk[k:k + batch_size]) for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pad(sequences: list[list[int]], value: int = 0) -> torch.Tensor:
    out = torch.full((len(sequences), max(map(len, sequences))), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s)
    return out


# ----------------------------------------------------------------------------- helpers

def _distributed(device: torch.device) -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(distributed_backend(device))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _leave_distributed(finished: bool) -> None:
    """Tear the process group down before the interpreter exits. A group left for exit to destroy
    (DistributedDataParallel keeps it alive through reference cycles) joins gloo's threads in
    arbitrary order and can abort with 'terminate called without an active exception'. After a
    finished run a barrier first, so no process leaves while another still talks to it; after an
    error none, since the others may never reach it."""
    gc.collect()  # free the DDP wrapper and its reducer, which hold the group
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_log(history: list[dict], out: Path) -> None:
    tmp = out / "log.jsonl.tmp"
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    os.replace(tmp, out / "log.jsonl")
    plot_curves(history, out / "curves.png")


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend()
    for key in ("BLEU-4", "CIDEr"):
        ax2.plot(epochs, [h.get(f"dev_{key}") for h in history], "o-", label=f"dev {key}")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("score"), ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- data and model

@dataclass
class Prepared:
    """Everything an epoch needs, built once by `prepare`."""
    data: CaptionData
    vocab: Vocabulary
    styles: list[str]
    train_images: list[str]
    dev_images: list[str]
    train_feats: FeatureRows  # .batch(rows) -> (B, R, D) fp16, row i = train_images[i]
    dev_feats: torch.Tensor
    items: list[tuple[int, list[int], int]]  # (image row, word ids, style id) per training caption
    captioner: Captioner
    device: torch.device
    last_stage_input: bool  # the cache holds what enters the encoder's last stage, not grids
    mirror_feats: FeatureRows | None = None  # the training images flipped left to right
    mirror_ids: torch.Tensor | None = None  # word id -> its mirror image's word (left <-> right)

    def mirrored(self, seed: int, epoch: int) -> np.ndarray | None:
        """Which training images are seen mirrored this epoch (a random half), None without a mirror cache.
        Its own random stream, so the batches are the same as without mirroring."""
        if self.mirror_feats is None:
            return None
        return np.random.default_rng([seed, epoch, 1]).random(len(self.train_images)) < 0.5

    def train_batch(self, rows: Sequence[int], mirrored: np.ndarray | None = None) -> torch.Tensor:
        """Cached rows of training images, the mirrored view where `mirrored[row]`: (B, R, D) fp16."""
        feats = self.train_feats.batch(rows)
        flip = None if mirrored is None else mirrored[np.asarray(rows)]
        if flip is not None and flip.any():
            feats[torch.from_numpy(flip)] = self.mirror_feats.batch(np.asarray(rows)[flip])
        return feats

    def concepts(self, grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A grounded decoder's concept input for these grids, made as when captioning (the ImageNet
        head's likeliest concepts and the person probe); None for a decoder without concepts."""
        if not self.captioner.config.concept_tokens:
            return None
        ids, probs = self.captioner.concepts(self.captioner.seen(grids.detach().float().cpu().numpy()))
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(probs).to(self.device)

    def grids(self, cached: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
        """Cached rows -> (B, regions, dim) fp32 grids on the device: through the encoder's last
        stage (trained or not) when the cache holds what enters it."""
        x = cached.to(self.device, non_blocking=True).float()
        if self.last_stage_input:
            with autocast(self.device, amp):
                x = self.captioner.encoder.last_stage(x).float()
        return x


def prepare(cfg: TrainConfig, device: torch.device, main_process: bool = True) -> Prepared:
    data = load_training_data(cfg)
    train_images = _first(data.images("train"), cfg.train_images)
    dev_images = _first(data.images("dev"), cfg.dev_images)
    keep = set(train_images)
    train_records = [r for r in data.select("train") if r.image in keep]
    cache = FeatureCache(cfg.features)
    last_stage_input = cache.stage == LAST_STAGE_INPUT
    if cfg.finetune_encoder and not last_stage_input:
        raise ValueError(f"--finetune-encoder trains on what enters the encoder's last stage, and {cfg.features} "
                         "holds finished grids: make a cache with `aicrl extract-features --last-stage-input`")
    missing = [n for n in train_images + dev_images if n not in cache.available]
    if missing:
        log.warning("%d images have no cached features and are left out", len(missing))
        train_images = [n for n in train_images if n in cache.available]
        dev_images = [n for n in dev_images if n in cache.available]

    if cfg.init_from:  # continue from a trained model: its vocabulary, styles and weights
        captioner = Captioner.from_pretrained(cfg.init_from, backend="torch", device="cpu")  # moved to the device below
        if captioner.config.encoder != cache.encoder:
            raise ValueError(f"{cfg.init_from} was trained on {captioner.config.encoder} features, "
                             f"the cache holds {cache.encoder}")
        unknown = set(data.styles()) - set(captioner.styles)
        if unknown:
            raise ValueError(f"{cfg.init_from} knows the styles {captioner.styles}, not {sorted(unknown)}")
        vocab, styles = captioner.vocab, captioner.styles
    else:
        vocab = Vocabulary.build((r.caption for r in train_records), cfg.min_freq)
        styles = data.styles()
        model_cfg = CaptionerConfig(encoder=cache.encoder, decoder=cfg.decoder,
                                    feature_dim=ENCODERS.get(cache.encoder, cache.dim) if last_stage_input else cache.dim,
                                    vocab_size=len(vocab),
                                    embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
                                    attention_dim=cfg.attention_dim, style_dim=cfg.style_dim, styles=styles,
                                    dropout=cfg.dropout)
        captioner = Captioner(model_cfg, vocab, build_decoder(model_cfg))

    mirror_feats = mirror_ids = None
    if cfg.mirrored_features:
        mirror = FeatureCache(cfg.mirrored_features)
        if not mirror.mirrored or (mirror.encoder, mirror.stage) != (cache.encoder, cache.stage):
            raise ValueError(f"{cfg.mirrored_features} is not a mirrored cache of {cfg.features}: make it with "
                             f"`aicrl extract-features --mirror` and the same encoder and stage")
        train_images = [n for n in train_images if n in mirror.available]
        mirror_feats = FeatureRows(mirror, train_images, in_memory=cfg.features_in_memory)
        mirror_ids = torch.tensor(vocab.mirror_ids(), device=device)

    row = {n: i for i, n in enumerate(train_images)}
    items = [(row[r.image], vocab.encode(r.caption, cfg.max_words), styles.index(r.style))
             for r in train_records if r.image in row]
    if main_process:
        log.info("%d training captions of %d images, %d dev images, vocabulary %d, styles %s",
                 len(items), len(train_images), len(dev_images), len(vocab), styles)
    return Prepared(data, vocab, styles, train_images, dev_images,
                    FeatureRows(cache, train_images, in_memory=cfg.features_in_memory), cache.get(dev_images),
                    items, captioner.to(device), device, last_stage_input, mirror_feats, mirror_ids)


# ----------------------------------------------------------------------------- objectives

class CrossEntropy:
    """Teacher forcing on every training caption; batches of captions sorted by length."""

    def __init__(self, cfg: TrainConfig, run: Prepared, amp: torch.dtype | None):
        self.cfg, self.run, self.amp = cfg, run, amp
        self.mirrored: np.ndarray | None = None  # this epoch's mirrored training images

    def batches(self, epoch: int) -> list[np.ndarray]:
        self.mirrored = self.run.mirrored(self.cfg.seed, epoch)
        return make_batches([len(it[1]) for it in self.run.items], self.cfg.batch_size,
                            np.random.default_rng([self.cfg.seed, epoch]))

    def loss(self, net: torch.nn.Module, batch: np.ndarray, items=None) -> torch.Tensor:
        chosen = [(items or self.run.items)[j] for j in batch]
        rows = [c[0] for c in chosen]
        feats = self.run.grids(self.run.train_batch(rows, self.mirrored), self.amp)
        device = self.run.device
        captions = pad([c[1] for c in chosen], self.run.vocab.pad).to(device, non_blocking=True)
        if self.mirrored is not None:
            flip = torch.from_numpy(self.mirrored[rows]).to(device)
            captions = torch.where(flip.unsqueeze(1), self.run.mirror_ids[captions], captions)
        style_ids = torch.tensor([c[2] for c in chosen], device=device) if len(self.run.styles) > 1 else None
        concepts = self.run.concepts(feats)
        with autocast(device, self.amp):
            logits, alphas = net(feats, captions, style_ids, concepts)
        return caption_loss(logits, alphas, captions[:, 1:], self.run.vocab.pad, self.cfg.attention_penalty,
                            self.cfg.label_smoothing)


class SelfCritical:
    """Batches of images; each image's captions sampled `scst_samples` times and rewarded with CIDEr-D
    against all its factual references (document frequencies from the training references). A model
    with styles also takes a cross-entropy batch of styled captions per step (weight `scst_style_ce`;
    of all captions with `scst_ce_all`), so that optimising the factual captions does not wash the
    styles (or the vocabulary) out."""

    def __init__(self, cfg: TrainConfig, run: Prepared, amp: torch.dtype | None):
        if cfg.scst_samples < 2:
            raise ValueError("self-critical training needs --scst-samples >= 2 (the baseline is the others' mean)")
        self.cfg, self.run, self.amp = cfg, run, amp
        refs = run.data.references("train")
        self.refs = {n: [tokenize(r) for r in refs[n]] for n in run.train_images if n in refs}
        self.images = [i for i, n in enumerate(run.train_images) if n in self.refs]
        self.cider = CiderD(self.refs)
        if run.mirror_feats is not None:  # a mirrored photo's references say right for left
            swap = lambda words: [MIRROR_SWAPS.get(w, w) for w in words]  # noqa: E731
            self.refs |= {n + MIRRORED: [swap(r) for r in rs] for n, rs in list(self.refs.items())}
        self.factual = run.styles.index(FACTUAL) if FACTUAL in run.styles else 0  # the style rewarded
        self.ce_items = [it for it in run.items if it[2] != self.factual or cfg.scst_ce_all]
        self.ce = CrossEntropy(cfg, run, amp)
        self.last_reward = 0.0

    def batches(self, epoch: int) -> list[np.ndarray]:
        self.ce.mirrored = self.run.mirrored(self.cfg.seed, epoch)  # shared with the cross-entropy batches
        rng = np.random.default_rng([self.cfg.seed, epoch])
        order = rng.permutation(self.images)
        batches = [order[i:i + self.cfg.batch_size] for i in range(0, len(order), self.cfg.batch_size)]
        if self.ce_items and self.cfg.scst_style_ce:  # pair every image batch with a batch of captions
            order = rng.permutation(len(self.ce_items))
            size = max(1, len(order) // max(len(batches), 1))
            batches = [(b, order[k * size:(k + 1) * size][: self.cfg.batch_size]) for k, b in enumerate(batches)]
        return batches

    def loss(self, net: torch.nn.Module, batch) -> torch.Tensor:
        rows, ce_batch = batch if isinstance(batch, tuple) else (batch, None)
        names = [self.run.train_images[r] for r in rows]
        decoder = net.module if hasattr(net, "module") else net
        n, v = self.cfg.scst_samples, self.run.vocab
        device = self.run.device
        style_ids = torch.full((len(rows),), self.factual, dtype=torch.long, device=device) \
            if len(self.run.styles) > 1 else None
        mirrored = self.ce.mirrored
        feats = self.run.grids(self.run.train_batch(rows, mirrored), self.amp)
        if mirrored is not None:
            names = [name + MIRRORED if mirrored[r] else name for name, r in zip(names, rows)]
        with autocast(device, self.amp):
            samples = sample(decoder, feats, v.start, v.end, n, self.cfg.scst_max_words, style_ids,
                             concepts=self.run.concepts(feats))
        rewards = torch.tensor(self.cider.scores(samples.word_lists(v.itos, v.end),
                                                 [name for name in names for _ in range(n)], self.refs),
                               device=device)
        self.last_reward = float(rewards.mean())
        loss = self_critical_loss(samples, rewards, n)
        if ce_batch is not None and len(ce_batch):
            loss = loss + self.cfg.scst_style_ce * self.ce.loss(net, ce_batch, self.ce_items)
        return loss


# ----------------------------------------------------------------------------- the steps of an epoch

def run_epoch(objective, net: torch.nn.Module, optimizer, scaler, params: list, batches: list, cfg: TrainConfig,
              desc: str, show: bool, sync_grads: list | None = None) -> tuple[float, int, float]:
    """One pass over `batches`; returns (mean loss, steps, mean reward or 0)."""
    net.train()
    total, rewards, count = 0.0, 0.0, 0
    bar = tqdm(batches, desc=desc, unit="batch", disable=not show, file=sys.stderr)
    for batch in bar:
        loss = objective.loss(net, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for p in sync_grads or []:  # DDP wraps the decoder only: average these by hand
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        total, count = total + loss.item(), count + 1
        rewards += getattr(objective, "last_reward", 0.0)
        bar.set_postfix(loss=f"{total / count:.3f}", **({"reward": f"{rewards / count:.3f}"}
                                                          if isinstance(objective, SelfCritical) else {}))
    return total / max(count, 1), count, rewards / max(count, 1)


def evaluate_dev(run: Prepared, cfg: TrainConfig, amp=None) -> dict[str, float]:
    """Dev BLEU-4 and CIDEr of beam search (`eval_beam`) on the dev images, and how many distinct
    words and captions it wrote (self-critical training is known to shrink both)."""
    feats = run.dev_feats
    if run.last_stage_input:  # the encoder's last stage (perhaps being trained) makes the grids
        with torch.inference_mode():
            feats = torch.cat([run.grids(feats[i:i + 100], amp) for i in range(0, len(feats), 100)])
    row = {n: i for i, n in enumerate(run.dev_images)}
    preds = caption_images(run.captioner, run.dev_images, lambda chunk: feats[[row[n] for n in chunk]],
                           cfg.eval_beam, batch_size=100, progress=False)
    varied = diversity(preds)
    return quick_scores(preds, run.data.references("dev")) | {"words": varied["distinct_words"],
                                                              "captions": varied["distinct_captions"]}


def save_checkpoint(path: Path, decoder, encoder, optimizer, scheduler, scaler, progress: dict,
                    cfg: TrainConfig, vocab: Vocabulary, device: torch.device) -> None:
    _atomic_save({"model": decoder.state_dict(), "encoder": encoder.state_dict() if encoder else {},
                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
                  "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                  **progress, "vocab": vocab.itos, "config": asdict(cfg)}, path)


def load_checkpoint(path: Path, decoder, encoder, optimizer, scheduler, scaler, vocab: Vocabulary,
                    device: torch.device) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["vocab"] != vocab.itos:
        raise ValueError("the checkpoint was trained with another vocabulary: same data and settings?")
    decoder.load_state_dict(ckpt["model"])
    if encoder is not None:
        encoder.load_state_dict(ckpt["encoder"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["torch_rng"])
    if device.type == "cuda" and ckpt.get("cuda_rng") is not None:  # sampling and dropout draw on the GPU
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    return {k: ckpt[k] for k in ("epoch", "step", "best", "bad_epochs", "history")}


# ----------------------------------------------------------------------------- training

def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train a captioner; returns a summary (best epoch, its dev scores, seconds). Under torchrun it
    starts the process group and tears it down, whether training ends or fails."""
    device = resolve_device(cfg.device)
    owns_group = not dist.is_initialized()
    rank, world = _distributed(device)
    try:
        summary = _train(cfg, resume, device, rank, world)
    except BaseException:
        if owns_group and dist.is_initialized():
            _leave_distributed(finished=False)
        raise
    if owns_group and dist.is_initialized():
        _leave_distributed(finished=True)
    return summary


def _train(cfg: TrainConfig, resume: bool, device: torch.device, rank: int, world: int) -> dict:
    main_process = rank == 0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}; choose from {sorted(OBJECTIVES)}")
    if cfg.objective == "self-critical" and world > 1:
        # sampling calls the decoder's steps, not DistributedDataParallel's forward, so gradients
        # would not be averaged across processes
        raise ValueError("self-critical training runs in one process for now: start it without torchrun")

    run = prepare(cfg, device, main_process)
    captioner, decoder, amp = run.captioner, run.captioner.decoder, autocast_dtype(cfg.precision, device)
    scaler = grad_scaler(device, amp)
    groups = [{"params": list(decoder.parameters())}]
    encoder = None
    if cfg.finetune_encoder:  # the paper fine-tunes: the encoder's last stage learns on its cached input
        encoder = captioner.encoder
        encoder.set_trainable(last_stage=True)
        captioner.encoder_finetuned = True
        groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": cfg.encoder_lr})
    net = data_parallel(decoder, device) if world > 1 else decoder
    params = [p for g in groups for p in g["params"]]
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_decay,
                                                           patience=cfg.lr_patience)
    objective = (SelfCritical(cfg, run, amp) if cfg.objective == "self-critical"
                 else CrossEntropy(cfg, run, amp))

    progress = {"epoch": 0, "step": 0, "best": -math.inf, "bad_epochs": 0, "history": []}
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        progress = load_checkpoint(ckpt_path, decoder, encoder, optimizer, scheduler, scaler, run.vocab, device)
        if main_process:
            log.info("resuming after epoch %d (step %d)", progress["epoch"], progress["step"])
    elif resume and main_process:
        log.info("no checkpoint in %s: starting from scratch", out)
    if main_process:
        ModelFolder(out).write_train_config(asdict(cfg))  # the run folder keeps them under the same name
    history = progress["history"]

    t_start = time.perf_counter()
    for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
        if progress["bad_epochs"] >= cfg.early_stop or (cfg.max_steps and progress["step"] >= cfg.max_steps):
            break
        t0, cpu0 = time.perf_counter(), time.process_time()
        # Same order on every process and on resume: the shuffle depends only on (seed, epoch).
        batches = objective.batches(epoch)
        batches = batches[: len(batches) // world * world][rank::world]
        if cfg.max_steps:
            batches = batches[: cfg.max_steps - progress["step"]]
        loss, steps, reward = run_epoch(objective, net, optimizer, scaler, params, batches, cfg, f"epoch {epoch}",
                                        main_process and cfg.show_progress,
                                        groups[1]["params"] if encoder is not None and world > 1 else None)
        progress["step"] += steps
        train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0

        # --- evaluate on dev (rank 0), share the score so every process steps the same way
        keys = ("BLEU-4", "CIDEr", "words", "captions")
        score = torch.zeros(len(keys), device=device)  # nccl only moves GPU tensors
        if main_process:
            dev = evaluate_dev(run, cfg, amp)
            score = torch.tensor([float(dev[k]) for k in keys], device=device)
        if world > 1:
            dist.broadcast(score, 0)
        dev = {k: float(v) for k, v in zip(keys, score.tolist())}
        current = dev[cfg.metric]
        scheduler.step(current)
        improved = current > progress["best"]
        progress["best"], progress["bad_epochs"] = ((current, 0) if improved
                                                    else (progress["best"], progress["bad_epochs"] + 1))
        per_step = cfg.batch_size * (cfg.scst_samples if isinstance(objective, SelfCritical) else 1)
        history.append({"epoch": epoch, "step": progress["step"], "objective": cfg.objective,
                        "train_loss": round(loss, 4), **({"train_reward": round(reward, 4)}
                                                         if isinstance(objective, SelfCritical) else {}),
                        "dev_BLEU-4": round(dev["BLEU-4"], 4), "dev_CIDEr": round(dev["CIDEr"], 4),
                        "dev_words": int(dev["words"]), "dev_captions": int(dev["captions"]),
                        "lr": optimizer.param_groups[0]["lr"], "train_seconds": round(train_seconds, 1),
                        "train_cpu_seconds": round(train_cpu_seconds, 3), "seconds": round(time.perf_counter() - t0, 1),
                        "captions_per_s": round(steps * per_step * world / train_seconds, 1)})
        progress["epoch"] = epoch
        if main_process:
            log.info("epoch %d: %s", epoch, history[-1])
            if improved:
                captioner.save_pretrained(out / "best", metrics={"dev": dev, "epoch": epoch},
                                          command=command_line())
                ModelFolder(out / "best").write_train_config(asdict(cfg))
            save_checkpoint(ckpt_path, decoder, encoder, optimizer, scheduler, scaler, progress, cfg, run.vocab,
                            device)
            _write_log(history, out)
        if world > 1:
            dist.barrier()

    checksums = None
    if world > 1:  # prove the replicas stayed identical: every process reports its weights' checksum
        mine = torch.tensor([sum(p.double().sum().item() for p in decoder.state_dict().values())],
                            dtype=torch.float64, device=device)
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        checksums = [float(g) for g in gathered]
    best_entry = max(history, key=lambda h: h[f"dev_{cfg.metric}"]) if history else {}
    return {"best_epoch": best_entry.get("epoch"), "dev_BLEU-4": best_entry.get("dev_BLEU-4"),
            "dev_CIDEr": best_entry.get("dev_CIDEr"), "final_train_loss": history[-1]["train_loss"] if history else None,
            "epochs_run": len(history), "seconds": round(time.perf_counter() - t_start, 1),
            "out": str(out), "rank": rank, "world_size": world, "replica_checksums": checksums}


OBJECTIVES = {"cross-entropy": CrossEntropy, "self-critical": SelfCritical}

def command_line() -> str:
    prog = "torchrun ... aicrl" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "aicrl"
    return " ".join([prog, *map(shlex.quote, sys.argv[1:])])
