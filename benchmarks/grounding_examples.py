"""Captions of everyday photos from two models side by side, with the encoder's tags, as Markdown.

    python benchmarks/grounding_examples.py --before OLD_MODEL --after NEW_MODEL PHOTOS... \\
        [--style factual] [--out docs/grounding_examples.md]

PHOTOS are files or folders (e.g. ../shared/data/coco_mini/train2017, tests/samples). Each row
gives a photo's tags, each model's best caption, and the newer model's agreement check (what it
names that the encoder rules out, what confident concept it leaves out). Reading these, not only
scores, tells whether the captions are true.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from aicrl.data.images import image_files
from aicrl.model.captioner import Captioner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos", nargs="+", help="photo files or folders")
    p.add_argument("--before", required=True, metavar="DIR", help="model folder before")
    p.add_argument("--after", metavar="DIR", help="model folder after (default: the shipped model)")
    p.add_argument("--style", default="factual")
    p.add_argument("--limit", type=int, default=0, help="at most this many photos (0: all)")
    p.add_argument("--out", metavar="FILE", help="write the table here too")
    args = p.parse_args()
    files = [f for path in map(Path, args.photos) for f in (image_files(path) if path.is_dir() else [path])]
    files = files[: args.limit or None]
    models = [Captioner.from_pretrained(args.before), Captioner.from_pretrained(args.after)]
    rows = ["| photo | tags | before | after | after: unsupported / missed |", "|---|---|---|---|---|"]
    for start in range(0, len(files), 8):
        chunk = files[start:start + 8]
        before, after = (m.caption(chunk, style=args.style) for m in models)
        for f, old, new in zip(chunk, before, after):
            tags = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in new.tags[:3])
            best = new.captions[0]
            check = " / ".join(", ".join(best.grounding.get(k, [])) or "-" for k in ("unsupported", "missed"))
            rows.append(f"| {f.name} | {tags} | {old.captions[0].text} | {best.text} | {check} |")
    table = "\n".join(rows) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
