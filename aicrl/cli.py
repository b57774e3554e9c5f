"""The `aicrl` command: thin wrappers that parse arguments and call the library."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _add_extract(sub) -> None:
    p = sub.add_parser("extract-features", help="cache the encoder's grid features of a dataset's images",
                       description="Run the encoder once over every image of a dataset and write the "
                       "grid features (fp16, memory-mapped) to a cache folder that training reads. "
                       "Resumable: rerun the same command after an interruption.")
    p.add_argument("--dataset", choices=["flickr8k", "coco"], default="flickr8k")
    p.add_argument("--data-dir", required=True, help="dataset folder, e.g. ../shared/data/flickr8k")
    p.add_argument("--encoder", default="efficientnet-lite2", choices=["efficientnet-lite2", "resnet50"])
    p.add_argument("--encoder-weights", help="local ImageNet weights file for the encoder")
    p.add_argument("--out", required=True, help="cache folder to write (or resume)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the CPU supports it (3x faster here, cosine >= 0.99)")
    p.add_argument("--workers", type=int, default=1, help="image-decoding worker processes")
    p.set_defaults(func=cmd_extract)


def cmd_extract(args) -> int:
    from .data.datasets import load_dataset
    from .data.features import extract_features
    from .model.encoders import build_encoder

    data = load_dataset(args.dataset, args.data_dir)
    encoder = build_encoder(args.encoder, weights=args.encoder_weights)
    summary = extract_features(encoder, data.image_dir, data.images(), args.out, args.batch_size,
                               args.precision, args.workers)
    print(json.dumps(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aicrl", description="AICRL: image captioning with a pretrained CNN encoder and an "
        "attention LSTM decoder. Caption photos, train and evaluate models, serve the web app.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_extract,):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
