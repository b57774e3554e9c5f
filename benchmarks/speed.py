"""Speed of the shipped model on this machine, torch and ONNX Runtime side by side in one run.

    python benchmarks/speed.py [--model DIR] [--images FOLDER] [--runs 30] [--count 64] [--json]
                               [--backends torch,onnx[,torch-fp32]] [--training]

Measures, per backend: one image end to end (read the file, preprocess, encode, beam search) p50/p95,
batch-of-32 throughput, the decoder alone, a cold `aicrl caption one.jpg` process (wall) and
`aicrl --help`. `torch-fp32` is the torch path with autocast off: what `precision: auto` runs on a CPU
without native bf16 (AVX2 only), so the ratio on such machines can be seen on this one too. The
backends are measured alternately, run by run, so a machine that is busy with
something else slows both alike and the ratios stay fair. Prints a Markdown table (or JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from aicrl.data.images import image_files, load_image
from aicrl.devices import autocast
from aicrl.model.captioner import Captioner

SAMPLES = Path(__file__).resolve().parent.parent / "tests" / "samples"


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def machine() -> str:
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    isa = "AMX+AVX512-bf16" if "amx_bf16" in flags else "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{name}, {os.cpu_count()} cores, {isa}, load average {load:.1f} at start"


def latency(models: dict[str, Captioner], paths: list[Path], runs: int, beam: int) -> dict:
    """One image at a time, end to end; the backends take turns."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.caption([paths[0]], beam)  # warm-up
    for i in range(runs):
        for name, model in models.items():
            t0 = time.perf_counter()
            model.caption([paths[i % len(paths)]], beam)
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: {"one_image_p50_ms": statistics.median(t), "one_image_p95_ms": _percentile(t, 0.95)}
            for name, t in times.items()}


def throughput(models: dict[str, Captioner], images: list, beam: int, batch: int, rounds: int = 2) -> dict:
    """Images/s in batches of `batch`, end to end and for the beam search alone (best of `rounds`)."""
    out = {name: {"batch_img_s": 0.0, "decode_batch_img_s": 0.0} for name in models}
    for model in models.values():
        model.caption(images[:batch], beam)  # warm-up
    for _ in range(rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            for i in range(0, len(images), batch):
                model.caption(images[i:i + batch], beam)
            out[name]["batch_img_s"] = max(out[name]["batch_img_s"], len(images) / (time.perf_counter() - t0))
            features = model.encode(images[:batch])
            t0 = time.perf_counter()
            model.decode(features, beam)
            out[name]["decode_batch_img_s"] = max(out[name]["decode_batch_img_s"], batch / (time.perf_counter() - t0))
    return out


def _wall(command: list[str], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, timeout=300)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cold_start(backends: list[str], model: str | None, photo: Path) -> dict:
    """Wall time of a fresh `aicrl caption one.jpg` process per backend, and of `aicrl --help`."""
    aicrl = [sys.executable, "-m", "aicrl.cli"]
    extra = ["--model", model] if model else []
    out = {name: {"cold_caption_s": _wall(aicrl + ["caption", str(photo), "--backend", name] + extra)}
           for name in backends}
    out["help_s"] = _wall(aicrl + ["--help"])
    return out


def training_speed(model: Captioner, batch: int = 64, length: int = 14, steps: int = 10) -> dict:
    """Captions/s of training steps (forward + backward + Adam) on cached-feature-shaped input."""
    import torch

    from aicrl.model.decoder import caption_loss

    decoder = model.decoder.train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-4)
    features = torch.randn(batch, 49, model.config.feature_dim)
    captions = torch.randint(4, model.config.vocab_size, (batch, length + 2))
    captions[:, 0] = model.vocab.start
    result = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        t0 = None
        for step in range(steps + 2):
            if step == 2:
                t0 = time.perf_counter()  # two warm-up steps
            with autocast("cpu", dtype):
                logits, alphas = decoder(features, captions)
            loss = caption_loss(logits, alphas, captions[:, 1:], model.vocab.pad)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        result[f"train_{name}_captions_s"] = batch * steps / (time.perf_counter() - t0)
    decoder.eval()
    return result


ROWS = [("one image end to end, p50", "one_image_p50_ms", "{:.0f} ms", "lower"),
        ("one image end to end, p95", "one_image_p95_ms", "{:.0f} ms", "lower"),
        ("batch of {batch}, end to end", "batch_img_s", "{:.1f} img/s", "higher"),
        ("beam search alone, batch of {batch}", "decode_batch_img_s", "{:.1f} img/s", "higher"),
        ("cold `aicrl caption one.jpg` (wall)", "cold_caption_s", "{:.2f} s", "lower")]


def load(model: str | None, backend: str) -> Captioner:
    """`backend`: torch, onnx, onnx-int8, or torch-fp32 (torch with autocast off)."""
    if backend != "torch-fp32":
        return Captioner.from_pretrained(model, backend=backend)
    captioner = Captioner.from_pretrained(model, backend="torch")
    captioner.config.precision = "fp32"
    return captioner


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--images", default=str(SAMPLES), help="folder of photos to caption")
    parser.add_argument("--count", type=int, default=64, help="images for the throughput runs")
    parser.add_argument("--runs", type=int, default=30, help="single-image latency runs")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backends", default="torch,onnx", help="comma-separated: torch, onnx, onnx-int8, torch-fp32")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-process measures")
    parser.add_argument("--training", action="store_true", help="also measure training steps (torch)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    backends = args.backends.split(",")
    models = {name: load(args.model, name) for name in backends}
    paths = image_files(args.images, recursive=False)
    images = [load_image(paths[i % len(paths)]) for i in range(args.count)]
    result: dict = {"machine": machine(), "beam_size": args.beam_size, "batch_size": args.batch_size,
                    "precision": {name: ("int8" if m.runtime.int8 else "fp32") if m.runtime
                                  else f"torch autocast: {m.config.precision}" for name, m in models.items()}}
    per = {name: {} for name in backends}
    for name, values in latency(models, paths, args.runs, args.beam_size).items():
        per[name] |= values
    for name, values in throughput(models, images, args.beam_size, args.batch_size).items():
        per[name] |= values
    if not args.no_cold:
        cold = cold_start([b for b in backends if b in ("torch", "onnx")], args.model, paths[0])
        result["help_s"] = cold.pop("help_s")
        for name, values in cold.items():
            per[name] |= values
    result["backends"] = per
    if args.training and "torch" in models:
        result |= training_speed(models["torch"])
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"Machine: {result['machine']}; beam {args.beam_size}; {result['precision']}\n")
    both = "torch" in per and "onnx" in per
    print("| measure | " + " | ".join(backends) + (" | onnx / torch |" if both else " |"))
    print("|---|" + "---:|" * (len(backends) + both))
    for label, key, fmt, _ in ROWS:
        if not all(key in per[b] for b in backends if b != "torch-fp32"):
            continue
        cells = [fmt.format(per[b][key]) if key in per[b] else "" for b in backends]
        ratio = [f"{per['onnx'][key] / per['torch'][key]:.2f}x"] if both else []
        if both and "torch-fp32" in per and key in per["torch-fp32"]:
            ratio[0] += f" ({per['onnx'][key] / per['torch-fp32'][key]:.2f}x fp32)"
        print(f"| {label.format(batch=args.batch_size)} | " + " | ".join(cells + ratio) + " |")
    if "help_s" in result:
        print(f"| `aicrl --help` (wall) | " + " | ".join([f"{result['help_s']:.2f} s"] * len(backends))
              + (" | |" if both else " |"))
    for key in ("train_fp32_captions_s", "train_bf16_captions_s"):
        if key in result:
            print(f"| training, {key.split('_')[1]} (batch 64) | {result[key]:.0f} captions/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
