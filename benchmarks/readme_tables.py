"""The README's result tables, generated from the shipped model's metrics.json (never typed by hand).

    python benchmarks/readme_tables.py            # print the tables
    python benchmarks/readme_tables.py --write    # replace them in README.md between their markers

tests/test_readme.py fails when the README's tables differ from what this script makes.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from aicrl.model.folder import ModelFolder

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ModelFolder(ROOT / "aicrl" / "pretrained")  # this checkout's model, not an installed copy's
METRICS = SHIPPED.metrics
README = ROOT / "README.md"
COCO = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

# Published Flickr8k figures (quoted second-hand, see docs/published_results.md): not ours to measure.
PUBLISHED = [
    ("Show, Attend and Tell, soft attention (published)", {"BLEU-1": 0.67, "BLEU-2": 0.448, "BLEU-3": 0.299,
                                                           "BLEU-4": 0.195, "METEOR": 0.189}),
    ("Show, Attend and Tell, hard attention (published)", {"BLEU-1": 0.67, "BLEU-2": 0.457, "BLEU-3": 0.314,
                                                           "BLEU-4": 0.213, "METEOR": 0.203}),
]

# metrics.json key -> row label, in table order (rows whose key is missing are left out)
QUALITY_ROWS = [
    ("test_factual", "**AICRL shipped model**, beam 3"),
    ("test_factual_greedy", "the same, greedy decoding"),
    ("second_grounding_test_factual", "the grounding stage run again (the previous shipped model), beam 3"),
    ("first_grounding_test_factual", "the first grounding stage, beam 3"),
    ("ungrounded_test_factual", "before the grounding stage, beam 3"),
    ("frozen_encoder_test", "before fine-tuning the encoder's last stage, beam 3"),
    ("cross_entropy_start_test", "before self-critical training (the cross-entropy model it started from), beam 3"),
]
# Truth beyond Flickr8k: (key, row label); the keys' results carry "grounding" (aicrl evaluate)
GROUNDING_ROWS = [
    ("all_factual", "**shipped model**, coco_mini (80 everyday photos)"),
    ("second_grounding_all_factual", "the grounding stage run again (previous shipped model), coco_mini"),
    ("first_grounding_all_factual", "the first grounding stage, coco_mini"),
    ("ungrounded_all_factual", "before the grounding stage, coco_mini"),
    ("test_factual", "**shipped model**, Flickr8k test"),
    ("second_grounding_test_factual", "the grounding stage run again (previous shipped model), Flickr8k test"),
    ("first_grounding_test_factual", "the first grounding stage, Flickr8k test"),
    ("ungrounded_test_factual", "before the grounding stage, Flickr8k test"),
]
STYLE_ROWS = [
    ("cross_entropy_start_flickrstyle_dev_humorous", "humorous, before (the cross-entropy model)"),
    ("ungrounded_flickrstyle_dev_humorous", "humorous, before the grounding stage"),
    ("first_grounding_flickrstyle_dev_humorous", "humorous, the first grounding stage"),
    ("second_grounding_flickrstyle_dev_humorous", "humorous, the grounding stage run again (previous shipped model)"),
    ("flickrstyle_dev_humorous", "**humorous** (shipped)"),
    ("cross_entropy_start_flickrstyle_dev_romantic", "romantic, before (the cross-entropy model)"),
    ("ungrounded_flickrstyle_dev_romantic", "romantic, before the grounding stage"),
    ("first_grounding_flickrstyle_dev_romantic", "romantic, the first grounding stage"),
    ("second_grounding_flickrstyle_dev_romantic", "romantic, the grounding stage run again (previous shipped model)"),
    ("flickrstyle_dev_romantic", "**romantic** (shipped)"),
]


def _f(x) -> str:
    return "" if x is None else f"{x:.3f}"


def _label(label: str, result: dict) -> str:
    """A row's label; results that `aicrl evaluate` got on torch (its default before it recorded a
    backend) say so: the product runs ONNX Runtime, which writes another best caption for a fifth of
    the photos (torch's bf16 autocast against fp32)."""
    return label if result.get("backend") == "onnx" else f"{label} (torch)"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _top(div: dict) -> str:
    return f"\"{div['top_trigram']}\" {_pct(div['top_trigram_share'])}" if div.get("top_trigram") else ""


def quality_table(metrics: dict) -> str:
    lines = ["| model | " + " | ".join(COCO) + " | words used | distinct captions | top trigram (share of captions) |",
             "|---|" + "---:|" * (len(COCO) + 2) + "---|"]
    for key, label in QUALITY_ROWS:
        if key not in metrics:
            continue
        scores, div = metrics[key]["coco_caption"], metrics[key].get("diversity", {})
        lines.append(f"| {_label(label, metrics[key])} | " + " | ".join(_f(scores.get(k)) for k in COCO)
                     + f" | {div.get('distinct_words', '')} | {div.get('distinct_captions', '')} | {_top(div)} |")
    for label, scores in PUBLISHED:
        lines.append(f"| {label} | " + " | ".join(_f(scores.get(k)) for k in COCO) + " | | | |")
    lines.append('| the paper ("ResNet-50 and LSTM") | no Flickr8k numbers found |' + " |" * (len(COCO) + 2))
    return "\n".join(lines)


def style_table(metrics: dict) -> str:
    lines = ["| style | BLEU-1 | BLEU-3 | METEOR | CIDEr | style accuracy | content overlap "
             "| top trigram (share of captions) | distinct captions | broken joins | fluency judge (mean P) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for key, label in STYLE_ROWS:
        if key not in metrics:
            continue
        m = metrics[key]
        div = m.get("diversity", {})
        lines.append(f"| {_label(label, m)} | {_f(m.get('BLEU-1'))} | "
                     f"{_f(m.get('BLEU-3'))} | {_f(m.get('METEOR'))} | {_f(m.get('CIDEr'))} | "
                     f"{_pct(m.get('style_accuracy'))} | {_pct(m.get('content_overlap'))} | {_top(div)} | "
                     f"{div.get('distinct_captions', '')} | {_pct(m.get('grammar_error_rate'))} | "
                     f"{_f(m.get('fluency', {}).get('mean'))} |")
    return "\n".join(lines)


def grounding_table(metrics: dict) -> str:
    lines = ["| model, photos | BLEU-4 | CIDEr | CHAIR-s | CHAIR-i | invented person or dog | tag named (tags >= 0.5) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in GROUNDING_ROWS:
        g = metrics.get(key, {}).get("grounding")
        if not isinstance(g, dict):
            continue
        scores, chair, tags = metrics[key]["coco_caption"], g.get("chair", {}), g.get("tags", {})
        chair, tags = (x if isinstance(x, dict) else {} for x in (chair, tags))
        lines.append(f"| {_label(label, metrics[key])} | {_f(scores.get('BLEU-4'))} | {_f(scores.get('CIDEr'))} | {_f(chair.get('chair_s'))} "
                     f"| {_f(chair.get('chair_i'))} | {_pct(g['person_dog_hallucination']['person_or_dog'])} "
                     f"| {_pct(tags.get('tag_agreement'))} |")
    return "\n".join(lines)


def blind_table(metrics: dict) -> str:
    """Blind ratings of how captions read (benchmarks/blind_rating.py, docs/blind_rating.md); factual
    captions are not rated witty."""
    lines = ["| rating (docs/ratings/) | captions | n | well-formed | witty |", "|---|---|---:|---:|---:|"]
    for name, result in metrics.get("blind_ratings", {}).items():
        for group, r in result.items():
            if isinstance(r, dict) and "well_formed" in r:
                source, style = group.rsplit("_", 1)
                label = "people" if source == "human" else source
                lines.append(f"| {name} | {label}, {style} | {r['n']} | {_pct(r['well_formed'])} | {_pct(r.get('witty')) or '-'} |")
    return "\n".join(lines)


TABLES = {"quality": quality_table, "styles": style_table, "grounding": grounding_table, "blind": blind_table}


def render(readme: str, metrics: dict) -> str:
    """`readme` with every <!-- table:NAME --> ... <!-- /table:NAME --> block regenerated."""
    for name, make in TABLES.items():
        # an empty block (nothing between the markers) is filled too
        pattern = re.compile(rf"(<!-- table:{name} -->\n)(?:.*?\n)?(<!-- /table:{name} -->)", re.S)
        readme = pattern.sub(lambda m: m.group(1) + make(metrics) + "\n" + m.group(2), readme)
    return readme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the tables in README.md")
    args = parser.parse_args()
    metrics = SHIPPED.read_metrics()
    if args.write:
        README.write_text(render(README.read_text(), metrics))
    else:
        for make in TABLES.values():
            print(make(metrics) + "\n")


if __name__ == "__main__":
    main()
