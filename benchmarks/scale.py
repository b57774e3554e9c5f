"""Training memory and speed at COCO scale: features read per batch from the cache file vs in RAM.

    python benchmarks/scale.py --images 20000 [--steps 200] [--batch-size 64] [--device cpu]

Builds a synthetic COCO 2017 folder (N images, 5 generated captions each, in
annotations/captions_train2017.json) and a feature cache of N random fp16 7x7x1280 grids in the real
cache format (what `aicrl extract-features` writes: 125 KB an image, 15 GB for COCO's 118k), then
runs the real `aicrl train --dataset coco ... --max-steps S` twice, each in its own process:

- per_batch: the default, each batch's grids read from features.npy (the page cache does the rest)
- in_memory: `--features-in-memory`, the whole training set copied into RAM first

and prints one JSON line: per mode the process's peak RSS (MB, from wait4, so the modes cannot
pollute each other; the cache is built in a process of its own and this one never imports torch,
because Linux counts the parent's peak at fork/exec in the child's ru_maxrss) and the training captions per second (log.jsonl): per wall-clock second and
per CPU-second of the training loop (the fair comparison on a shared machine; run it with
OMP_NUM_THREADS=1 so that one thread does the work). With --repeats R the modes take turns R
times and each reports its best run (a busy machine only ever slows a run down). A mode that would
not fit in the available memory is skipped, with the reason. Everything is written under --dir and
deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REGIONS, DIM = 49, 1280
ROW_BYTES = REGIONS * DIM * 2
CAPTIONS_PER_IMAGE = 5


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def write_dataset(root: Path, n: int, rng: np.random.Generator) -> list[str]:
    """COCO-format captions: 5 per image, ~11 words drawn from a Zipf law over 10,000 words
    (COCO: 10.5 words a caption), so the vocabulary and caption lengths look like the real ones."""
    (root / "annotations").mkdir(parents=True)
    files = [f"{i:012d}.jpg" for i in range(1, n + 1)]
    lengths = rng.integers(8, 15, n * CAPTIONS_PER_IMAGE)
    words = (rng.zipf(1.3, int(lengths.sum())) - 1) % 10_000
    ends = np.cumsum(lengths)
    annotations = [{"image_id": k // CAPTIONS_PER_IMAGE + 1, "id": k,
                    "caption": "a " + " ".join(f"w{w}" for w in words[e - length:e])}
                   for k, (e, length) in enumerate(zip(ends.tolist(), lengths.tolist()))]
    images = [{"id": i + 1, "file_name": f} for i, f in enumerate(files)]
    with open(root / "annotations" / "captions_train2017.json", "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return [f"train2017/{f}" for f in files]


def write_cache(cache: Path, names: list[str], rng: np.random.Generator, chunk: int = 1024) -> None:
    """The files `aicrl extract-features` writes, with random grids: a pool of 2,048 random grids,
    shifted by a random offset per chunk (fresh random numbers for 15 GB would cost minutes of CPU
    and change nothing that is measured; every row is still its own page on disk)."""
    cache.mkdir(parents=True)
    n = len(names)
    pool = rng.standard_normal((2 * chunk, REGIONS, DIM), dtype=np.float32).astype(np.float16)
    feats = np.lib.format.open_memmap(cache / "features.npy", "w+", np.float16, (n, REGIONS, DIM))
    for i in tqdm(range(0, n, chunk), desc="synthetic cache", unit="chunk", file=sys.stderr):
        rows = min(chunk, n - i)
        start = int(rng.integers(0, chunk))
        feats[i:i + rows] = pool[start:start + rows]
    feats.flush()
    del feats
    np.save(cache / "done.npy", np.ones(n, np.uint8))
    (cache / "index.json").write_text(json.dumps({"encoder": "efficientnet-lite2", "regions": REGIONS,
                                                  "dim": DIM, "dtype": "float16", "images": names}))


def build(work: Path, n: int) -> None:
    """The synthetic dataset and cache, in a child process (see the module's docstring)."""
    rng = np.random.default_rng(0)
    write_cache(work / "cache", write_dataset(work / "data", n, rng), rng)


def run_mode(work: Path, mode: str, args) -> dict:
    """`aicrl train` in a child process; its own peak RSS comes from wait4."""
    out = work / f"run-{mode}"
    cmd = [sys.executable, "-m", "aicrl.cli", "train", "--dataset", "coco", "--data-dir", str(work / "data"),
           "--features", str(work / "cache"), "--epochs", "1", "--max-steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--dev-images", "16", "--eval-beam", "1",
           "--device", args.device, "--out", str(out)] + (["--features-in-memory"] if mode == "in_memory" else [])
    with open(work / f"{mode}.log", "w") as log:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{mode}: aicrl train failed ({child.returncode}):\n"
                           + (work / f"{mode}.log").read_text()[-3000:])
    epoch = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    maxrss_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    captions = epoch["step"] * args.batch_size
    # captions per CPU-second of the training loop: what a busy machine's scheduler cannot skew
    # (OMP_NUM_THREADS=1: one thread does the work); captions_per_s is the wall-clock figure
    return {"peak_rss_mb": round(maxrss_bytes / 2**20),
            "captions_per_cpu_s": round(captions / max(epoch["train_cpu_seconds"], 1e-9), 1),
            "captions_per_s": epoch["captions_per_s"], "train_seconds": epoch["train_seconds"],
            "train_cpu_seconds": epoch["train_cpu_seconds"], "process_seconds": round(seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, required=True, help="images in the synthetic cache (COCO: 118,287)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per mode")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="--device of aicrl train")
    parser.add_argument("--modes", default="per_batch,in_memory", help="comma-separated: per_batch, in_memory")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, taking turns; the best counts")
    parser.add_argument("--dir", default=str(Path.home() / ".cache" / "aicrl-scale"),
                        help="scratch folder (deleted afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    cache_bytes = args.images * ROW_BYTES
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    need = cache_bytes * 1.02 + args.images * 400 + 2**30  # grids + captions json + 1 GB to spare
    if need > free:
        sys.exit(f"scale.py: needs {need / 2**30:.1f} GB in {base}, {free / 2**30:.1f} GB free (--dir elsewhere?)")
    work = base / f"scale-{args.images}-{os.getpid()}"
    result = {"images": args.images, "cache_gb": round(cache_bytes / 1e9, 2), "steps": args.steps,
              "batch_size": args.batch_size, "device": args.device, "cpu": cpu_name(),
              "threads": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    try:
        result["cpu_capability"] = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
            capture_output=True, text=True, check=True).stdout.strip()
        t0 = time.perf_counter()
        builder = multiprocessing.get_context("spawn").Process(target=build, args=(work, args.images))
        builder.start()
        builder.join()
        if builder.exitcode:
            raise RuntimeError(f"building the synthetic cache failed ({builder.exitcode})")
        result["build_seconds"] = round(time.perf_counter() - t0, 1)
        for _ in range(args.repeats):
            for mode in args.modes.split(","):
                available = mem_available_bytes()
                # the copy plus torch and the captions, with room left for everything else running
                if mode == "in_memory" and cache_bytes * 1.3 + 2**31 > 0.8 * available:
                    result[mode] = {"skipped": f"needs about {cache_bytes * 1.3 / 2**30 + 2:.0f} GB of RAM, "
                                               f"{available / 2**30:.1f} GB available"}
                    continue
                run = run_mode(work, mode, args)
                best = result.get(mode, run)
                result[mode] = max(best, run, key=lambda r: r["captions_per_cpu_s"]) | {
                    "peak_rss_mb": max(best["peak_rss_mb"], run["peak_rss_mb"]), "runs": best.get("runs", 0) + 1}
        if "captions_per_s" in result.get("in_memory", {}) and "captions_per_s" in result.get("per_batch", {}):
            for key in ("captions_per_cpu_s", "captions_per_s"):
                result[f"per_batch_vs_in_memory_{key}"] = round(result["per_batch"][key] / result["in_memory"][key], 3)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
