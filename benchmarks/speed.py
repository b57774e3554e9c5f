"""Speed of the shipped model on this machine: latency, batched throughput, training throughput.

    python benchmarks/speed.py [--model DIR] [--images FOLDER] [--runs 30] [--json]

Prints a Markdown table (or JSON). Batched beam search is compared, in the same run, with the same
images captioned one at a time, so the gain of batching is a measured ratio.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from aicrl.data.images import image_files, load_image
from aicrl.model.captioner import Captioner
from aicrl.devices import autocast
from aicrl.model.decoder import caption_loss

SAMPLES = Path(__file__).resolve().parent.parent / "tests" / "samples"


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def latency(model: Captioner, paths: list[Path], runs: int, beam: int, style: str | None = None) -> dict:
    """One image at a time, end to end: read the file, preprocess, encode, beam search."""
    model.caption([paths[0]], beam, style=style)  # warm-up
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        model.caption([paths[i % len(paths)]], beam, style=style)
        times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": statistics.median(times), "p95_ms": _percentile(times, 0.95)}


def throughput(model: Captioner, images: list, beam: int, batch: int) -> dict:
    """Images/s batched vs one by one, end to end and for the decoder alone."""
    model.caption(images[:batch], beam)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        model.caption(images[i:i + batch], beam)
    batched = len(images) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for image in images:
        model.caption([image], beam)
    single = len(images) / (time.perf_counter() - t0)
    features = model.encode(images[:batch])
    t0 = time.perf_counter()
    model.decode(features, beam)
    decode_batched = batch / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(batch):
        model.decode(features[i:i + 1], beam)
    decode_single = batch / (time.perf_counter() - t0)
    return {"batched_img_s": batched, "one_at_a_time_img_s": single, "end_to_end_gain": batched / single,
            "decode_batched_img_s": decode_batched, "decode_one_at_a_time_img_s": decode_single,
            "decode_gain": decode_batched / decode_single}


def training_speed(model: Captioner, batch: int = 64, length: int = 14, steps: int = 10) -> dict:
    """Captions/s of training steps (forward + backward + Adam) on cached-feature-shaped input."""
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--images", default=str(SAMPLES), help="folder of photos to caption")
    parser.add_argument("--count", type=int, default=64, help="images for the throughput runs")
    parser.add_argument("--runs", type=int, default=30, help="single-image latency runs")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = Captioner.from_pretrained(args.model)
    paths = image_files(args.images, recursive=False)
    images = [load_image(paths[i % len(paths)]) for i in range(args.count)]
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}",
              "beam_size": args.beam_size, "batch_size": args.batch_size}
    result |= latency(model, paths, args.runs, args.beam_size)
    styled = model.styles[-1] if len(model.styles) > 1 else None
    if styled:  # a styled caption decodes twice when style guidance is on (styled + factual pass)
        result["styled"] = styled
        result["styled_median_ms"] = latency(model, paths, args.runs, args.beam_size, styled)["median_ms"]
    result |= throughput(model, images, args.beam_size, args.batch_size)
    result |= training_speed(model)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [("one image end to end, median", f"{result['median_ms']:.0f} ms"),
            ("one image end to end, p95", f"{result['p95_ms']:.0f} ms"),
            *([(f"one image end to end, {styled} style (guidance {model.config.style_guidance:g}), median",
                f"{result['styled_median_ms']:.0f} ms")] if styled else []),
            (f"batched (batch {args.batch_size}), end to end", f"{result['batched_img_s']:.1f} images/s"),
            ("one at a time, end to end", f"{result['one_at_a_time_img_s']:.1f} images/s"),
            ("gain of batching, end to end", f"{result['end_to_end_gain']:.2f}x"),
            (f"beam search alone, batched ({args.batch_size})", f"{result['decode_batched_img_s']:.1f} images/s"),
            ("beam search alone, one at a time", f"{result['decode_one_at_a_time_img_s']:.1f} images/s"),
            ("gain of batching, beam search", f"{result['decode_gain']:.2f}x"),
            ("training, fp32 (batch 64)", f"{result['train_fp32_captions_s']:.0f} captions/s"),
            ("training, bf16 autocast (batch 64)", f"{result['train_bf16_captions_s']:.0f} captions/s")]
    print(f"Machine: {result['machine']}; beam {args.beam_size}\n")
    print("| measure | value |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
