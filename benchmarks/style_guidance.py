"""Sweep the style guidance weight (and the fluency rerank's): style accuracy, content overlap and
fluency of styled captions.

    python benchmarks/style_guidance.py --data-dir ../shared/data/flickr8k \
        --style-file ../shared/data/flickrstyle7k/flickrstyle7k.jsonl --features cache/flickr8k-lite2 \
        [--model DIR] [--weights 0,0.5,1,1.5,2] [--fluency-weights 0,2] [--limit 500] [--json]

Runs on the Flickr8k *test* images: FlickrStyle has no captions for them, so choosing the weight here
leaves the FlickrStyle dev images (where `aicrl evaluate --style` reports) untouched. Style accuracy is
judged by the same classifier as `aicrl evaluate --style`; content overlap against the factual references;
fluency by the model folder's judge (aicrl/fluency.py): mean P(well-formed) and the share judged well-formed.
"""
from __future__ import annotations

import argparse
import collections
import json

from aicrl.data.datasets import load_dataset, read_style_jsonl
from aicrl.evaluation import (caption_images, content_overlap, diversity, features_source, fit_style_classifier,
                              fluency_scores)
from aicrl.model.captioner import Captioner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="flickr8k", help="flickr8k or coco")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--split", default="test", help="images to caption (choose one the reported "
                        "style scores do not use)")
    parser.add_argument("--style-file", required=True)
    parser.add_argument("--features", help="feature cache of the model's encoder")
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--weights", default="0,0.5,1,1.5,2", help="comma-separated guidance weights")
    parser.add_argument("--fluency-weights", default="", help="comma-separated fluency rerank weights "
                        "(config.fluency_weight; default: the model's)")
    parser.add_argument("--styles", default="", help="comma-separated (default: every style but the first)")
    parser.add_argument("--limit", type=int, default=500, help="first N images of the split")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = parser.parse_args()

    captioner = Captioner.from_pretrained(args.model)
    data = load_dataset(args.dataset, args.data_dir)
    classifier = fit_style_classifier(data, read_style_jsonl(args.style_file, data.image_dir))
    refs = data.references(args.split)
    names = list(refs)[: args.limit]
    features_of = features_source(captioner, data.image_dir, args.features)
    if not args.json:
        print("| style | guidance | fluency weight | style accuracy | judged factual | judged other style | "
              "content overlap | fluent | words | top trigram | example |\n|---|---|---|---|---|---|---|---|---|---|---|")
    fluency_weights = [float(w) for w in args.fluency_weights.split(",")] if args.fluency_weights \
        else [captioner.config.fluency_weight]
    styles = args.styles.split(",") if args.styles else captioner.styles[1:]
    for style in styles:
        for weight, fluency_weight in ((w, f) for w in map(float, args.weights.split(",")) for f in fluency_weights):
            captioner.config.style_guidance = weight
            captioner.config.fluency_weight = fluency_weight
            preds = caption_images(captioner, names, features_of, args.beam_size, style, progress=False)
            judged = collections.Counter(classifier.predict(list(preds.values())))
            row = {"style": style, "guidance": weight, "fluency_weight": fluency_weight,
                   "fluency": fluency_scores(captioner, preds), "style_accuracy": judged[style] / len(preds),
                   "judged": dict(judged), "content_overlap": content_overlap(preds, refs),
                   "mean_words": sum(len(p.split()) for p in preds.values()) / len(preds),
                   "diversity": diversity(preds), "example": preds[names[0]]}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                other = len(preds) - judged[style] - judged[captioner.styles[0]]
                print(f"| {style} | {weight:g} | {fluency_weight:g} | {row['style_accuracy']:.1%} | "
                      f"{judged[captioner.styles[0]] / len(preds):.1%} | {other / len(preds):.1%} | "
                      f"{row['content_overlap']:.1%} | {row['fluency'].get('fluent', float('nan')):.1%} | "
                      f"{row['mean_words']:.1f} | "
                      f"\"{row['diversity']['top_trigram']}\" {row['diversity']['top_trigram_share']:.1%} | "
                      f"{row['example']} |", flush=True)


if __name__ == "__main__":
    main()
