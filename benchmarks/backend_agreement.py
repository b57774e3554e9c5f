"""Do the backends write the same captions? Torch vs ONNX Runtime (fp32, and int8 if exported) on a split.

    python benchmarks/backend_agreement.py --data-dir ../shared/data/flickr8k [--split test] [--limit 1000]
        [--model DIR] [--int8] [--json]

Captions every image of the split end to end (image file -> encoder -> beam search) with each
configuration, then reports the share of images whose best caption is identical to the torch
path's, and BLEU-4 / CIDEr (coco-caption toolkit) of each against the split's references. Torch runs
as `aicrl caption --backend torch` does (its `precision: auto` is bf16 autocast on CPUs with
AVX512/AMX) and in fp32. Needs aicrl[train] (torch, pycocoevalcap).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from aicrl.data.datasets import load_dataset
from aicrl.data.images import load_image
from aicrl.evaluation import coco_scores
from aicrl.model.captioner import Captioner


def caption_all(model: Captioner, images: list, beam: int, batch: int = 50) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(images), batch):
        out += [r.captions[0].text for r in model.caption(images[i:i + batch], beam)]
    return out, len(images) / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="flickr8k")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--model", help="model folder with an fp32 export (default: the shipped model)")
    parser.add_argument("--int8", action="store_true", help="also the model's int8 graphs (`aicrl export --int8`)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    data = load_dataset(args.dataset, args.data_dir)
    refs = data.references(args.split)
    names = list(refs)[: args.limit or None]
    images = [load_image(data.image_dir / n) for n in names]
    configs = {"torch (auto precision)": Captioner.from_pretrained(args.model, backend="torch")}
    fp32 = Captioner.from_pretrained(args.model, backend="torch")
    fp32.config.precision = "fp32"
    configs["torch fp32"] = fp32
    configs["onnx"] = Captioner.from_pretrained(args.model, backend="onnx")
    if args.int8:
        configs["onnx int8"] = Captioner.from_pretrained(args.model, backend="onnx-int8")
    captions, speed = {}, {}
    for name, model in configs.items():
        captions[name], speed[name] = caption_all(model, images, args.beam_size)
        print(f"{name}: {speed[name]:.1f} images/s", file=sys.stderr, flush=True)
    reference = captions["torch (auto precision)"]
    rows = {}
    for name, texts in captions.items():
        scores = coco_scores(dict(zip(names, texts)), refs, metrics=("bleu", "cider"))
        rows[name] = {"same_as_torch": sum(a == b for a, b in zip(texts, reference)) / len(names),
                      "same_as_torch_fp32": sum(a == b for a, b in zip(texts, captions["torch fp32"])) / len(names),
                      "BLEU-4": scores["BLEU-4"], "CIDEr": scores["CIDEr"], "images_per_s": speed[name]}
    if args.json:
        print(json.dumps({"images": len(names), "split": args.split, "rows": rows}, indent=2))
        return 0
    print(f"{len(names)} {args.dataset} {args.split} images, beam {args.beam_size}\n")
    print("| configuration | same best caption as torch (auto) | as torch fp32 | BLEU-4 | CIDEr |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['same_as_torch']:.1%} | {r['same_as_torch_fp32']:.1%} | {r['BLEU-4']:.4f} | {r['CIDEr']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
