"""The model card the Info tab shows, read from the model folder's own files (aicrl/model/folder.py):
config.json (the architecture), train_config.json (the data it learnt from), metrics.json (its scores)
and COMMAND.txt (shown as it is). Nothing here knows which data a model was trained on: that comes
from the folder, so a model trained on COCO is described as such. Needs neither torch nor the command
line: the web app runs on the base install.

    model_card(captioner, model_dir) -> dict   {"summary": [...], "scores": {...}, ...}

The summary is a few plain sentences (what the model is, what it learnt from, how well it does,
what it cannot do, what serves it); the raw facts follow for those who want them.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from ..data.datasets import DATASET_DESCRIPTIONS
from ..model.folder import ModelFolder, metrics_key

log = logging.getLogger(__name__)

GENERAL_LIMITATIONS = [
    "The vocabulary is only the words of its training captions; it cannot name anything it never read about "
    "(the tags can: they come from the encoder's ImageNet classifier, 1,000 object classes and no people).",
    "The photo is squashed to 224x224 pixels, so small details are lost, and the attention map is a coarse "
    "grid: it shows where the decoder looked, not a proof of why it chose a word.",
    "Captions can repeat the biases of their human-written training captions (for example guessing "
    "gender or age from appearance).",
    "English only. BLEU against your reference captions counts shared words and phrases, not meaning.",
]
# The metrics shown in the summary, in this order, where metrics.json has them.
HEADLINE = ("BLEU-4", "METEOR", "CIDEr")

def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


VERSION = _package_version("aicrl")


def _read(folder: ModelFolder, name: str) -> dict:
    """A json file of the folder, {} when it is missing or damaged (the card says what it can)."""
    try:
        return folder.read_json(name)
    except (OSError, ValueError) as e:
        log.warning("cannot read %s: %s", folder.path / name, e)
        return {}


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None


def training_data(metrics: dict, train_config: dict, styles: list[str]) -> dict:
    """{"dataset", "description", "style_data"} from metrics.json ("dataset", "style_data": a
    description written there wins) or else from train_config.json ("dataset", "style_file")."""
    dataset = _text(metrics.get("dataset")) or _text(train_config.get("dataset"))
    style_data = _text(metrics.get("style_data"))
    style_file = _text(train_config.get("style_file"))
    if style_data is None and style_file and len(styles) > 1:
        style_data = Path(style_file).stem
    return {"dataset": dataset, "description": DATASET_DESCRIPTIONS.get(dataset or "", dataset or "unknown"),
            "style_data": style_data}


def _scores(block: dict) -> dict:
    found = block.get("coco_caption") if isinstance(block.get("coco_caption"), dict) else block
    return {k: found[k] for k in HEADLINE if isinstance(found.get(k), (int, float))}


def headline_scores(metrics: dict) -> dict:
    """The test-split scores (BLEU-4, METEOR, CIDEr) and each style's accuracy, where recorded. The
    blocks `aicrl evaluate --save-to-model` writes (key "<split>_<style>": "test_factual",
    "flickrstyle_dev_humorous") win over others a metrics.json may also keep for other models or
    settings ("cross_entropy_start_test", "test_factual_greedy")."""
    out: dict = {}
    for key, block in metrics.items():
        if not isinstance(block, dict):
            continue
        own = key == metrics_key(str(block.get("split", "")), str(block.get("style", "factual")))
        if (key.startswith("test") and "factual" in key) or key == "test":
            scores = _scores(block)
            if scores and (own or "factual" not in out):
                out["factual"] = scores | {"split": block.get("split", "test"), "images": block.get("images")}
        elif "style_accuracy" in block and key.endswith(str(block.get("style"))):
            if own or block["style"] not in out:
                out[block["style"]] = {"style_accuracy": block["style_accuracy"], **_scores(block)}
    return out


def backend(captioner) -> str:
    """What runs the model: "ONNX Runtime <version> on CPU" or "PyTorch <version> on <device>"."""
    if getattr(captioner, "backend", "torch") == "onnx":
        import onnxruntime

        int8 = getattr(captioner.runtime, "int8", False)
        return f"ONNX Runtime {onnxruntime.__version__} on CPU" + (" (int8)" if int8 else "")
    # the version from the package's metadata: the card imports no torch, even for a torch model
    return f"PyTorch {_package_version('torch').split('+')[0]} on {getattr(captioner, 'device', 'cpu')}"


def summary(card: dict) -> list[str]:
    """The card in a few sentences, most important first."""
    a, data, scores = card["architecture"], card["training_data"], card["scores"]
    lines = [f"An image captioner: a {a['encoder']} image encoder (pretrained on ImageNet) and an LSTM "
             f"decoder that attends to a {a['encoder_features'].rsplit('x', 1)[0]} grid of image regions "
             "while it writes, one word at a time, with beam search."]
    learnt = f"Trained on {data['description']}"
    if data["style_data"]:
        learnt += f"; its {', '.join(card['styles'][1:])} styles on {data['style_data']}"
    lines.append(learnt + f". It knows {a['vocabulary']:,} words.")
    if "factual" in scores:
        f = scores["factual"]
        measured = ", ".join(f"{k} {f[k]:.3f}" for k in HEADLINE if k in f)
        where = f" on {f['images']:,} {f['split']} images" if isinstance(f.get("images"), int) else f" ({f['split']} split)"
        lines.append(f"Scores{where}: {measured} (0 to 1; CIDEr can exceed 1; higher is better).")
    styled = [f"{s} {v['style_accuracy']:.0%}" for s, v in scores.items() if s != "factual"]
    if styled:
        lines.append(f"Styled captions read as their style (by a text classifier): {', '.join(styled)}.")
    if not scores:
        lines.append("This model folder records no evaluation scores (no metrics.json).")
    lines.append(f"Served by {card['runtime']}.")
    return lines


def model_card(captioner, model_dir: Path | None) -> dict:
    """Everything the Info tab shows: `summary` (sentences) first, then the facts behind it."""
    from ..model.captioner import GRID

    cfg = captioner.config
    folder = ModelFolder(model_dir) if model_dir else None
    metrics = _read(folder, folder.METRICS) if folder else {}
    train_config = _read(folder, folder.TRAIN_CONFIG) if folder else {}
    command = folder.read_command() if folder else None
    styles = list(captioner.styles)
    try:
        params = captioner.parameter_counts()
    except Exception:  # noqa: BLE001  (a stand-in captioner in tests)
        params = {}
    data = training_data(metrics, train_config, styles)
    limitations = []
    if data["dataset"]:
        limitations.append(f"Trained on {data['description']}: photos unlike those (other subjects, drawings, "
                           "text, medical images) get generic or wrong captions.")
    if len(styles) > 1:
        limitations.append(f"The styles other than {styles[0]} were learnt from "
                           f"{data['style_data'] or 'a smaller set of styled captions'}: styled captions are less "
                           "accurate and less fluent than factual ones, and often end in a stock phrase of their style.")
    card = {
        "name": "AICRL image captioner",
        "version": VERSION,
        "model": model_dir.name if model_dir else None,
        "backend": getattr(captioner, "backend", "torch"),  # "onnx" or "torch"
        "runtime": backend(captioner),
        "architecture": {
            "summary": "CNN encoder (ImageNet-pretrained) + LSTM decoder with soft attention over a "
                       f"{GRID}x{GRID} grid of image regions (Show, Attend and Tell); beam search decoding.",
            "encoder": cfg.encoder,
            "encoder_features": f"{GRID}x{GRID}x{cfg.feature_dim}",
            "encoder_fine_tuned": bool(getattr(captioner, "encoder_finetuned", False)),
            "encoder_parameters": params.get("encoder"),
            "decoder": f"attention LSTM: embedding {cfg.embed_dim}, hidden {cfg.hidden_dim}, "
                       f"attention {cfg.attention_dim}, deep output layer, gated context",
            "decoder_parameters": params.get("decoder"),
            "vocabulary": len(captioner.vocab) if hasattr(captioner, "vocab") else cfg.vocab_size,
            "max_caption_words": cfg.max_length,
        },
        "training_data": data,
        "styles": styles,
        "default_style": styles[0],
        "scores": headline_scores(metrics),
        "metrics": metrics,
        "command": command[:4000] if command else None,
        "config": asdict(cfg),
        "limitations": limitations + GENERAL_LIMITATIONS,
    }
    card["summary"] = summary(card)
    return card
