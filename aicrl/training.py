"""The training loop: maximum likelihood with teacher forcing on cached encoder features.

Reads top to bottom: settings -> data -> model -> optimiser -> (resume) -> epochs of
[train, evaluate on dev, step the LR schedule, checkpoint, maybe stop early] -> best model folder.

Runs unchanged under `torchrun --nproc_per_node=N aicrl train ...` (DistributedDataParallel; gloo on
CPU, nccl on GPU): each process trains on its share of every epoch's batches, rank 0 evaluates and
writes files.

Files in the output folder:
    checkpoint.pt   the latest epoch (model, optimiser, schedule, RNG, history): --resume continues here
    best/           the best epoch so far as a model folder (Captioner.save_pretrained)
    log.jsonl       one line per epoch: loss, dev metrics, learning rate, seconds
    curves.png      the same as a picture
"""
from __future__ import annotations

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

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .config import CaptionerConfig
from .data.datasets import CaptionData, load_dataset, read_style_jsonl
from .data.features import FeatureCache, FeatureRows
from .data.images import preprocess
from .data.vocab import Vocabulary
from .devices import autocast, autocast_dtype, data_parallel, distributed_backend, grad_scaler, resolve_device
from .evaluation import caption_images, quick_scores
from .model.captioner import Captioner
from .model.decoder import AttentionLSTMDecoder, caption_loss

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    # data
    dataset: str = "flickr8k"
    data_dir: str = ""
    features: str = ""  # feature cache folder (aicrl extract-features)
    style_file: str = ""  # optional jsonl of styled captions (image, split, style, caption)
    style_repeat: int = 1  # how many times each styled caption is seen per epoch
    train_images: int = 0  # use only the first N training images (0 = all): for quick searches
    dev_images: int = 0  # evaluate on the first N dev images (0 = all)
    min_freq: int = 5
    max_words: int = 25  # training captions are cut to this many words
    # model
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    style_dim: int = 64
    dropout: float = 0.5
    # optimisation
    optimizer: str = "adam"  # adam or sgd (momentum 0.9)
    lr: float = 4e-4
    batch_size: int = 64
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
    finetune_encoder: bool = False  # train the encoder's last stage on images (slow on CPU)
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


# ----------------------------------------------------------------------------- training

def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train a captioner; returns a summary (best epoch, its dev scores, seconds)."""
    device = resolve_device(cfg.device)
    rank, world = _distributed(device)
    main_process = rank == 0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # --- data: captions -> (image row, word ids, style id); features read batch by batch
    data = load_training_data(cfg)
    train_images = _first(data.images("train"), cfg.train_images)
    dev_images = _first(data.images("dev"), cfg.dev_images)
    keep = set(train_images)
    train_records = [r for r in data.select("train") if r.image in keep]
    vocab = Vocabulary.build((r.caption for r in train_records), cfg.min_freq)
    styles = data.styles()
    cache = FeatureCache(cfg.features)
    missing = [n for n in train_images + dev_images if n not in cache.available]
    if missing:
        log.warning("%d images have no cached features and are left out", len(missing))
        train_images = [n for n in train_images if n in cache.available]
        dev_images = [n for n in dev_images if n in cache.available]
    row = {n: i for i, n in enumerate(train_images)}
    train_feats = FeatureRows(cache, train_images, in_memory=cfg.features_in_memory)
    dev_feats = cache.get(dev_images)
    items = [(row[r.image], vocab.encode(r.caption, cfg.max_words), styles.index(r.style))
             for r in train_records if r.image in row]
    dev_refs = data.references("dev")
    if main_process:
        log.info("%d training captions of %d images, %d dev images, vocabulary %d, styles %s",
                 len(items), len(train_images), len(dev_images), len(vocab), styles)

    # --- model
    model_cfg = CaptionerConfig(encoder=cache.encoder, feature_dim=cache.dim, vocab_size=len(vocab),
                                embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
                                attention_dim=cfg.attention_dim, style_dim=cfg.style_dim, styles=styles,
                                dropout=cfg.dropout)
    decoder = AttentionLSTMDecoder(model_cfg)
    captioner = Captioner(model_cfg, vocab, decoder).to(device)
    groups = [{"params": list(decoder.parameters())}]
    encoder = None
    if cfg.finetune_encoder:  # the paper fine-tunes: the encoder's last stage learns on the images
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

    def image_features(names: list[str], rows: list[int], cached) -> torch.Tensor:
        """Cached grids (FeatureRows or a tensor), or (when fine-tuning) grids from the encoder being trained."""
        if encoder is None:
            grids = cached.batch(rows) if isinstance(cached, FeatureRows) else cached[rows]
            return grids.to(device, non_blocking=True).float()
        images = torch.stack([preprocess(data.image_dir / names[r]) for r in rows]).to(device)
        with autocast(device, amp):
            return encoder(images.contiguous(memory_format=torch.channels_last)).float()
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_decay,
                                                           patience=cfg.lr_patience)
    amp = autocast_dtype(cfg.precision, device)
    scaler = grad_scaler(device, amp)

    # --- resume
    start_epoch, step, best, bad_epochs, history = 1, 0, -math.inf, 0, []
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
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
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:  # dropout draws on the GPU
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        best, bad_epochs, history = ckpt["best"], ckpt["bad_epochs"], ckpt["history"]
        if main_process:
            log.info("resuming after epoch %d (step %d)", ckpt["epoch"], step)
    elif resume and main_process:
        log.info("no checkpoint in %s: starting from scratch", out)

    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs + 1):
        if bad_epochs >= cfg.early_stop or (cfg.max_steps and step >= cfg.max_steps):
            break
        t0, cpu0 = time.perf_counter(), time.process_time()
        net.train()
        if encoder is not None:
            encoder.train()
        # Same order on every process and on resume: the shuffle depends only on (seed, epoch).
        batches = make_batches([len(it[1]) for it in items], cfg.batch_size,
                               np.random.default_rng([cfg.seed, epoch]))
        batches = batches[: len(batches) // world * world][rank::world]
        total, count = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch",
                   disable=not (main_process and cfg.show_progress), file=sys.stderr)
        for batch in bar:
            chosen = [items[j] for j in batch]
            feats = image_features(train_images, [c[0] for c in chosen], train_feats)
            captions = pad([c[1] for c in chosen], vocab.pad).to(device, non_blocking=True)
            style_ids = torch.tensor([c[2] for c in chosen], device=device) if len(styles) > 1 else None
            with autocast(device, amp):
                logits, alphas = net(feats, captions, style_ids)
            loss = caption_loss(logits, alphas, captions[:, 1:], vocab.pad, cfg.attention_penalty,
                                cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if encoder is not None and world > 1:  # DDP wraps the decoder only: average these by hand
                for p in groups[1]["params"]:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            if cfg.grad_clip:
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            total, count = total + loss.item(), count + 1
            bar.set_postfix(loss=f"{total / count:.3f}")
            if cfg.max_steps and step >= cfg.max_steps:
                break
        train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0

        # --- evaluate on dev (rank 0), share the score so every process steps the same way
        score = torch.zeros(3, device=device)  # nccl only moves GPU tensors
        if main_process:
            if encoder is not None:
                encoder.eval()
                with torch.inference_mode():
                    dev_feats = torch.cat([image_features(dev_images, list(range(i, min(i + 64, len(dev_images)))), dev_feats)
                                           for i in range(0, len(dev_images), 64)])
            dev_row = {n: i for i, n in enumerate(dev_images)}
            preds = caption_images(captioner, dev_images, lambda chunk: dev_feats[[dev_row[n] for n in chunk]],
                                   cfg.eval_beam, batch_size=100, progress=False)
            scores = quick_scores(preds, dev_refs)
            score = torch.tensor([scores["BLEU-4"], scores["CIDEr"], total / max(count, 1)], device=device)
        if world > 1:
            dist.broadcast(score, 0)
        dev = {"BLEU-4": float(score[0]), "CIDEr": float(score[1])}
        current = dev[cfg.metric]
        scheduler.step(current)
        improved = current > best
        best, bad_epochs = (current, 0) if improved else (best, bad_epochs + 1)
        history.append({"epoch": epoch, "step": step, "train_loss": round(total / max(count, 1), 4),
                        "dev_BLEU-4": round(dev["BLEU-4"], 4), "dev_CIDEr": round(dev["CIDEr"], 4),
                        "lr": optimizer.param_groups[0]["lr"], "train_seconds": round(train_seconds, 1),
                        "train_cpu_seconds": round(train_cpu_seconds, 1),
                        "seconds": round(time.perf_counter() - t0, 1), "captions_per_s":
                        round(count * cfg.batch_size * world / train_seconds, 1)})
        if main_process:
            log.info("epoch %d: %s", epoch, history[-1])
            if improved:
                captioner.save_pretrained(out / "best", metrics={"dev": dev, "epoch": epoch},
                                          command=command_line())
            _atomic_save({"model": decoder.state_dict(), "encoder": encoder.state_dict() if encoder else {},
                          "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                          "scaler": scaler.state_dict(),
                          "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                          "epoch": epoch, "step": step, "best": best, "bad_epochs": bad_epochs,
                          "history": history, "vocab": vocab.itos, "config": asdict(cfg)}, ckpt_path)
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
        dist.destroy_process_group()
    best_entry = max(history, key=lambda h: h[f"dev_{cfg.metric}"]) if history else {}
    return {"best_epoch": best_entry.get("epoch"), "dev_BLEU-4": best_entry.get("dev_BLEU-4"),
            "dev_CIDEr": best_entry.get("dev_CIDEr"), "final_train_loss": history[-1]["train_loss"] if history else None,
            "epochs_run": len(history), "seconds": round(time.perf_counter() - t_start, 1),
            "out": str(out), "rank": rank, "world_size": world, "replica_checksums": checksums}


def command_line() -> str:
    prog = "torchrun ... aicrl" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "aicrl"
    return " ".join([prog, *map(shlex.quote, sys.argv[1:])])
