"""Styled captions of random FlickrStyle dev images, before and after, as a Markdown table.

    python benchmarks/style_examples.py --before OLD_MODEL --after NEW_MODEL \\
        --data-dir ../shared/data/flickr8k --style-file ../shared/data/flickrstyle7k/flickrstyle7k.jsonl \\
        --features CACHE [--images 10] [--seed 0]

The images are drawn with a fixed seed from the dev images that have styled references (never
trained on); each row gives one image's humorous and romantic captions from both models.
"""
from __future__ import annotations

import argparse
import random

from aicrl.data.datasets import load_dataset, read_style_jsonl
from aicrl.evaluation import features_source
from aicrl.model.captioner import Captioner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, metavar="DIR", help="model folder before")
    p.add_argument("--after", metavar="DIR", help="model folder after (default: the shipped model)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--style-file", required=True)
    p.add_argument("--features", help="feature cache of the models' encoder")
    p.add_argument("--styles", default="humorous,romantic")
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    data = load_dataset("flickr8k", args.data_dir)
    styled = read_style_jsonl(args.style_file, data.image_dir)
    styles = args.styles.split(",")
    names = sorted(styled.references("dev", styles[0]))
    names = random.Random(args.seed).sample(names, args.images)
    models = {"before": Captioner.from_pretrained(args.before, backend="torch"),
              "after": Captioner.from_pretrained(args.after, backend="torch")}
    captions = {}
    for label, model in models.items():
        feats = features_source(model, data.image_dir, args.features)(names)
        for style in styles:
            for name, hyps in zip(names, model.decode(feats, style=style)):
                captions[name, style, label] = model.vocab.decode(hyps[0].tokens)
    print("| image | " + " | ".join(f"{s}, before | {s}, after" for s in styles) + " |")
    print("|---|" + "---|" * (2 * len(styles)))
    for name in names:
        cells = [captions[name, s, label] for s in styles for label in ("before", "after")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
