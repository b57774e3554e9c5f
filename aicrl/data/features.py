"""The feature cache: every image's encoder grid, computed once, memory-mapped for training.

Layout of a cache folder:
    features.npy   (N, regions, dim) float16, memory-mapped
    done.npy       (N,) uint8, 1 once an image's row is written (makes extraction resumable)
    index.json     encoder, shape and the image names, row i <-> images[i]; "stage":
                   "last-stage-input" when the rows hold what enters the encoder's last stage
                   (for fine-tuning it) instead of the finished grid; "mirrored": true when the
                   rows are of the images flipped left to right (augmentation for training)
    failed.json    images that could not be read, with the reason
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..devices import autocast, autocast_dtype, resolve_device  # noqa: F401  (autocast_dtype: old import path)
from .images import ImageLoadError, preprocess

log = logging.getLogger(__name__)

GRID, LAST_STAGE_INPUT = "grid", "last-stage-input"
STAGES = (GRID, LAST_STAGE_INPUT)


class _ImageFiles(Dataset):
    def __init__(self, image_dir: Path, names: Sequence[str], rows: Sequence[int], mirror: bool = False):
        self.image_dir, self.names, self.rows, self.mirror = image_dir, names, rows, mirror

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            image = preprocess(self.image_dir / self.names[row])
            return row, image.flip(-1) if self.mirror else image, ""
        except ImageLoadError as e:
            return row, torch.zeros(3, 224, 224), str(e)


def extract_features(encoder: torch.nn.Module, image_dir: str | Path, names: Sequence[str],
                     out_dir: str | Path, batch_size: int = 32, precision: str = "auto",
                     num_workers: int | None = None, device: str | torch.device = "cpu",
                     stage: str = GRID, mirror: bool = False) -> dict:
    """Write the grid features of `names` (files in `image_dir`) to the cache `out_dir`; with
    `stage="last-stage-input"`, what enters the encoder's last stage (its fine-tuning trains on that);
    with `mirror`, of the images flipped left to right (training sees them as more photos).

    Resumable: rows already marked done are skipped, so rerunning after an interruption continues.
    `num_workers` image-decoding processes (None: 1 on CPU, where the encoder needs the cores, up to
    8 on a GPU, which JPEG decoding must keep fed); on a GPU the batches come in pinned memory.
    Returns a summary dict (images done, failed, images/s, cache size in bytes).
    """
    image_dir, out = Path(image_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(names)
    device = resolve_device(device)
    if num_workers is None:
        num_workers = 1 if device.type == "cpu" else min(8, os.cpu_count() or 1)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
    encoder = encoder.eval().to(device, memory_format=torch.channels_last)
    if stage == LAST_STAGE_INPUT:  # (B, C, H, W) -> (B, H*W, C), the layout of grids
        encode = lambda images: encoder.up_to_last_stage(images).flatten(2).transpose(1, 2)  # noqa: E731
    else:
        encode = encoder
    with torch.inference_mode():
        regions, dim = encode(torch.zeros(1, 3, 224, 224, device=device)).shape[1:]
    index = {"encoder": getattr(encoder, "name", "custom"), "regions": int(regions), "dim": int(dim),
             "dtype": "float16", "images": names} | ({"stage": stage} if stage != GRID else {}) \
        | ({"mirrored": True} if mirror else {})
    index_file = out / "index.json"
    if index_file.exists():
        old = json.loads(index_file.read_text())
        if old != index:
            raise ValueError(f"{out} holds a different cache ({old['encoder']}, {len(old['images'])} "
                             "images); choose another --out or delete it")
        feats = np.load(out / "features.npy", mmap_mode="r+")
        done = np.load(out / "done.npy", mmap_mode="r+")
    else:
        feats = np.lib.format.open_memmap(out / "features.npy", "w+", np.float16, (len(names), regions, dim))
        done = np.lib.format.open_memmap(out / "done.npy", "w+", np.uint8, (len(names),))
        index_file.write_text(json.dumps(index))
    failed_file = out / "failed.json"
    failed = json.loads(failed_file.read_text()) if failed_file.exists() else {}
    todo = [i for i in range(len(names)) if not done[i] and names[i] not in failed]
    dtype = autocast_dtype(precision, device)
    loader = DataLoader(_ImageFiles(image_dir, names, todo, mirror), batch_size=batch_size,
                        num_workers=num_workers, persistent_workers=False, pin_memory=device.type == "cuda")
    start, count = time.perf_counter(), 0
    bar = tqdm(total=len(todo), desc=f"features ({index['encoder']})", unit="img")
    with torch.inference_mode():
        for rows, images, errors in loader:
            ok = [j for j, err in enumerate(errors) if not err]
            for j, err in enumerate(errors):
                if err:
                    failed[names[int(rows[j])]] = err
                    log.warning("skipping unreadable image: %s", err)
            if ok:
                batch = images if len(ok) == len(errors) else images[ok]  # (indexing would unpin)
                batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with autocast(device, dtype):
                    grid = encode(batch)
                rows_ok = rows[ok].numpy()
                feats[rows_ok] = grid.half().cpu().numpy()  # fp16 before the copy: half the transfer
                feats.flush()
                done[rows_ok] = 1  # only after the features are on disk
                done.flush()
            if any(errors):
                failed_file.write_text(json.dumps(failed, indent=1))
            count += len(rows)
            bar.update(len(rows))
            bar.set_postfix(img_s=f"{count / (time.perf_counter() - start):.1f}")
    bar.close()
    seconds = time.perf_counter() - start
    return {"images": len(names), "done": int(done.sum()), "failed": len(failed),
            "processed_now": count, "seconds": round(seconds, 1),
            "images_per_s": round(count / seconds, 1) if count else None,
            "cache_bytes": sum(f.stat().st_size for f in out.iterdir()), "precision": str(dtype or "fp32")}


class FeatureCache:
    """Read side of the cache: look up rows by image name."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        index = json.loads((self.dir / "index.json").read_text())
        self.encoder, self.regions, self.dim = index["encoder"], index["regions"], index["dim"]
        self.stage = index.get("stage", GRID)
        self.mirrored: bool = index.get("mirrored", False)
        self.names: list[str] = index["images"]
        self.row = {n: i for i, n in enumerate(self.names)}
        self.features = np.load(self.dir / "features.npy", mmap_mode="r")
        done = np.load(self.dir / "done.npy")
        self.available = {n for n, d in zip(self.names, done) if d}

    def __len__(self) -> int:
        return len(self.names)

    def get(self, names: Sequence[str]) -> torch.Tensor:
        """(len(names), regions, dim) float16 tensor."""
        rows = [self.row[n] for n in names]
        return torch.from_numpy(np.ascontiguousarray(self.features[rows]))


class FeatureRows:
    """The grids of a list of images, fetched a batch at a time for training:
    `rows.batch([i, j, ...])` -> (B, regions, dim) float16 tensor of images[i], images[j], ...

    By default every batch is read from features.npy with positioned reads (pread): the process
    holds one batch, whatever the size of the cache (COCO train2017: 15 GB), and the operating
    system's page cache keeps the rows in RAM while there is room, shared and given back under
    pressure. (Reading through the memory map does the same I/O, but every page touched counts in
    the process's RSS until the kernel reclaims it.) `in_memory=True` copies the rows into RAM once,
    as training always did: for small caches, or file systems where reads are slow.
    """

    def __init__(self, cache: FeatureCache, names: Sequence[str], in_memory: bool = False):
        self.rows = np.array([cache.row[n] for n in names], dtype=np.int64)
        self.shape = (cache.regions, cache.dim)
        self._memmap = cache.features
        self._row_bytes = cache.regions * cache.dim * np.dtype(np.float16).itemsize
        self._fd = None
        if hasattr(os, "preadv") and self._memmap.flags.c_contiguous:
            self._fd = os.open(cache.dir / "features.npy", os.O_RDONLY)
        # The in-memory copy is read the same way, so the file's pages are not counted twice.
        self.resident = torch.from_numpy(self._read(self.rows, progress=True)) if in_memory else None

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, rows: Sequence[int]) -> torch.Tensor:
        """(len(rows), regions, dim) float16 tensor; `rows` index the names given at construction."""
        if self.resident is not None:
            return self.resident[list(rows)]
        return torch.from_numpy(self._read(self.rows[np.asarray(rows, dtype=np.int64)]))

    def _read(self, wanted: np.ndarray, progress: bool = False) -> np.ndarray:
        if self._fd is None:  # no preadv (Windows): read through the memory map
            return np.ascontiguousarray(self._memmap[wanted])
        out = np.empty((len(wanted), *self.shape), np.float16)
        order = np.argsort(wanted, kind="stable")  # in file order: closer to sequential on disk
        for k in tqdm(order, desc="features into RAM", unit="img", disable=not progress, mininterval=2):
            offset = self._memmap.offset + int(wanted[k]) * self._row_bytes
            if os.preadv(self._fd, [out[k]], offset) != self._row_bytes:
                raise OSError(f"short read in {self._memmap.filename} at row {wanted[k]}: is the cache truncated?")
        return out

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except (OSError, TypeError):  # already closed, or the interpreter is shutting down
                pass
