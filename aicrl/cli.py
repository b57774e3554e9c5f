"""The `aicrl` command: thin wrappers that parse arguments and call the library."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .devices import DEVICE_HELP, add_device_option
from .serving.commands import add_backend, add_index, add_serve, beam_size_arg, variants_arg


def _add_extract(sub) -> None:
    p = sub.add_parser("extract-features", help="cache the encoder's grid features of a dataset's images",
                       description="Run the encoder once over every image of a dataset and write the "
                       "grid features (fp16, memory-mapped) to a cache folder that training reads. "
                       "Resumable: rerun the same command after an interruption.")
    p.add_argument("--dataset", choices=["flickr8k", "coco"], default="flickr8k",
                   help="which dataset's layout DATA_DIR has (default flickr8k)")
    p.add_argument("--data-dir", required=True, help="dataset folder, e.g. ../shared/data/flickr8k")
    p.add_argument("--encoder", default="efficientnet-lite2", choices=["efficientnet-lite2", "resnet50"],
                   help="the CNN whose grid features are cached; train and serve with the same one "
                        "(default efficientnet-lite2, whose weights ship with the package)")
    p.add_argument("--encoder-weights", metavar="FILE",
                   help="local ImageNet weights file for the encoder (default: the packaged or torchvision weights)")
    p.add_argument("--model", metavar="DIR", help="use this model folder's own encoder, with its fine-tuned "
                   "last stage (the grids its decoder reads: `aicrl ground --features`); overrides --encoder")
    p.add_argument("--out", required=True, metavar="DIR", help="cache folder to write (or resume)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per encoder batch (default 32)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto (the default): bf16 autocast where the hardware has it natively (CPU: 3x faster "
                        "here, cosine >= 0.99), fp16 on older GPUs, else fp32; fp32 for exact features")
    p.add_argument("--workers", type=int, metavar="N", help="image-decoding worker processes (default: 1 on CPU, "
                   "up to 8 on a GPU)")
    p.add_argument("--last-stage-input", action="store_true",
                   help="cache what enters the encoder's last stage instead of its grid (Lite2: 7x7x208, a "
                        "sixth of the size): `aicrl train --finetune-encoder` trains that stage on it")
    p.add_argument("--mirror", action="store_true",
                   help="cache the images flipped left to right: `aicrl train --mirrored-features` shows a "
                        "random half of the training images mirrored each epoch (left and right swapped in "
                        "their captions)")
    add_device_option(p)
    p.set_defaults(func=cmd_extract)


def cmd_extract(args) -> int:
    from .data.datasets import load_dataset
    from .data.features import GRID, LAST_STAGE_INPUT, extract_features
    from .model.encoders import build_encoder

    data = load_dataset(args.dataset, args.data_dir)
    if args.model:
        from .model.captioner import Captioner

        encoder = Captioner.from_pretrained(args.model, backend="torch", device="cpu").encoder
    else:
        encoder = build_encoder(args.encoder, weights=args.encoder_weights)
    summary = extract_features(encoder, data.image_dir, data.images(), args.out, args.batch_size,
                               args.precision, args.workers, args.device,
                               LAST_STAGE_INPUT if args.last_stage_input else GRID, args.mirror)
    print(json.dumps(summary))
    return 0


# Help for every TrainConfig field (the dataclass holds the defaults, shown after these texts).
TRAIN_HELP = {
    "dataset": "dataset layout of --data-dir: flickr8k or coco",
    "data_dir": "dataset folder (e.g. ../shared/data/flickr8k)",
    "features": "feature cache folder written by `aicrl extract-features` with the same encoder",
    "mirrored_features": "a cache of the same images flipped left to right (`extract-features --mirror`, same "
                         "encoder and stage): each epoch a random half of the training images is seen mirrored, "
                         "with left and right swapped in its captions (empty: no mirroring)",
    "style_file": "jsonl of styled captions (FlickrStyle7k format) to train a style-conditioned model; "
                  "empty: factual captions only",
    "style_repeat": "how many times each styled caption is seen per epoch (styled captions are fewer)",
    "train_images": "use only the first N training images (0 = all): for quick trials and searches",
    "dev_images": "score only the first N dev images after each epoch (0 = all)",
    "min_freq": "keep words seen at least this many times in the training captions; rarer ones become <unk>",
    "max_words": "training captions are cut to this many words",
    "decoder": "show-attend-tell (one LSTM with soft attention, the paper's) or up-down (an attention LSTM and "
               "a language LSTM, Anderson et al. 2018)",
    "embed_dim": "word embedding size",
    "hidden_dim": "LSTM hidden state size",
    "attention_dim": "size of the attention layer that scores the image regions",
    "style_dim": "size of the style embedding (used with --style-file)",
    "dropout": "dropout before the word classifier",
    "optimizer": "adam, or sgd (momentum 0.9)",
    "lr": "learning rate of the decoder",
    "batch_size": "captions (cross-entropy) or images (self-critical) per training step",
    "weight_decay": "L2 weight decay",
    "grad_clip": "clip the gradient norm to this value (0 = no clipping)",
    "label_smoothing": "label smoothing of the word targets (0 = none)",
    "attention_penalty": "weight of the doubly stochastic attention penalty (every region attended over a caption)",
    "lr_decay": "multiply the learning rate by this when the dev metric stops improving",
    "lr_patience": "epochs without improvement before the learning rate decays",
    "epochs": "most epochs to train",
    "early_stop": "stop after this many epochs without a better dev metric",
    "metric": "dev metric that selects the best epoch and drives early stopping: CIDEr or BLEU-4",
    "eval_beam": "beam width for the dev evaluation after each epoch",
    "precision": "decoder autocast: auto (bf16 where native, fp16 on older GPUs), bf16, fp16 or fp32",
    "device": DEVICE_HELP + "; under torchrun cuda is cuda:LOCAL_RANK",
    "features_in_memory": "copy the training features into RAM first, instead of reading each batch from the "
                          "cache file (small caches)",
    "max_steps": "stop after this many optimiser steps (0 = no limit): smoke runs, benchmarks",
    "init_from": "start from this model folder: its vocabulary, styles and weights (self-critical training "
                 "starts from a cross-entropy model)",
    "objective": "cross-entropy (teacher forcing) or self-critical (REINFORCE on CIDEr-D, baseline = the mean "
                 "reward of the image's other samples)",
    "scst_samples": "self-critical: captions sampled per image",
    "scst_max_words": "self-critical: longest sampled caption, in words",
    "scst_style_ce": "self-critical: weight of a cross-entropy batch of styled captions per step (0 = off)",
    "scst_ce_all": "self-critical: draw that cross-entropy batch from all training captions, factual ones too",
    "seed": "random seed (initialisation, shuffling, dropout)",
    "out": "output folder: checkpoint.pt, log.jsonl, curves.png and the best model in OUT/best",
    "finetune_encoder": "also train the encoder's last stage (needs a --features cache made with "
                        "`extract-features --last-stage-input`)",
    "encoder_lr": "learning rate of the encoder's last stage (with --finetune-encoder)",
}


def _train_options(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """One flag per TrainConfig field, so the dataclass stays the one place for defaults."""
    from dataclasses import fields

    from .training import TrainConfig

    p = sub.add_parser(name, **kwargs)
    for f in fields(TrainConfig):
        if f.name == "show_progress":
            continue
        flag = "--" + f.name.replace("_", "-")
        text = TRAIN_HELP.get(f.name, f.name.replace("_", " "))
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            required = f.name in ("data_dir", "features")
            shown = "" if required or f.default in ("", None) else f" (default {f.default})"
            p.add_argument(flag, type=kind, default=f.default, help=text + shown, required=required)
    return p


def _add_train(sub) -> None:
    p = _train_options(sub, "train", help="train the attention-LSTM decoder on cached features",
                       description="Train a captioner on a feature cache, by maximum likelihood (teacher "
                       "forcing) or, from a trained model (--init-from), by self-critical training on CIDEr-D "
                       "(--objective self-critical); --finetune-encoder also trains the encoder's last stage. "
                       "Writes checkpoint.pt after every epoch, log.jsonl, curves.png and the best epoch as a "
                       "model folder OUT/best. Works under torchrun --nproc_per_node=N (cross-entropy).")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=cmd_train)


def _add_search(sub) -> None:
    p = _train_options(sub, "search", help="run the paper's hyperparameter grid on a small budget",
                       description="Train every combination of learning rate {0.001, 0.01, 0.1} x batch "
                       "size {32, 64, 128} x optimizer {adam, sgd} with the other training options as the "
                       "budget (e.g. --train-images 1000 --epochs 2) and write a Markdown results table.")
    p.add_argument("--table", default="docs/hparam_search.md", metavar="FILE",
                   help="where to write the results table (default docs/hparam_search.md)")
    p.set_defaults(func=cmd_search)


GROUND_HELP = "teach a trained model to say what the encoder sees (concepts, caption text from outside Flickr8k)"


def _add_ground(sub) -> None:
    from dataclasses import fields

    from .grounding import REQUIRED, GroundingConfig

    p = sub.add_parser("ground", help=GROUND_HELP, description="The grounding stage (aicrl/grounding.py): widen a "
                       "trained model's vocabulary with caption text from outside Flickr8k, fit the person probe, "
                       "give the decoder the photo's concepts as extra regions and train it on photos, photos "
                       "without their grid, and caption text with the concepts it names. Resumable: rerun the "
                       "same command after a kill.")
    for f in fields(GroundingConfig):
        if str(f.type) == "bool":  # a switch, off by default
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        required = f.default is REQUIRED
        shown = "" if required or f.default == "" else f" (default {f.default})"
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, required=required,
                       default=None if required else f.default, help=f.metadata["help"] + shown)
    p.set_defaults(func=cmd_ground)


def cmd_ground(args) -> int:
    from dataclasses import fields

    from .grounding import GroundingConfig, ground

    print(json.dumps(ground(GroundingConfig(**{f.name: getattr(args, f.name) for f in fields(GroundingConfig)}))))
    return 0


def cmd_search(args) -> int:
    from .hparam_search import grid_search

    rows = grid_search(_train_config(args), args.table)
    print(json.dumps(rows[0]))
    return 0


def _train_config(args):
    from dataclasses import fields

    from .training import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})


def cmd_train(args) -> int:
    from .training import train

    summary = train(_train_config(args), resume=args.resume)
    if summary["rank"] == 0:  # one summary line, even when torchrun starts several processes
        print(json.dumps(summary), flush=True)
    return 0


def _expand(paths: list[str]) -> tuple[list[Path], bool, list[Path]]:
    """Files stay, folders become their image files (sorted). Returns (files, whether a folder
    was given, the folders without an image)."""
    from .data.images import image_files

    files, folder, empty = [], False, []
    for p in map(Path, paths):
        if p.is_dir():
            folder = True
            found = image_files(p)
            files += found
            if not found:
                empty.append(p)
        else:
            files.append(p)
    return files, folder, empty


STYLE_GUIDANCE_HELP = ("override the model's style guidance: how far a styled caption is pushed from the "
                       "factual one (0 = off; the model folder's config.json holds the tuned value)")


def _add_caption(sub) -> None:
    p = sub.add_parser("caption", help="caption image files or folders (the shipped model by default)",
                       description="Caption images with beam search. Prints one caption per image, or with "
                       "--json one JSON object per image per line: image, captions [{text, score, logprob}] "
                       "best first, style, tags [{label, probability}] (the encoder's ImageNet labels), and "
                       "timing_ms: encode and decode milliseconds per image, the time of the whole batch "
                       "divided by its batch_images. Unreadable files are reported on stderr (exit status 1); "
                       "no image at all is an error (exit status 2).")
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the model shipped with the package)")
    p.add_argument("--beam-size", type=beam_size_arg, default=3, metavar="K",
                   help="beam width, 1 (greedy) to 10 (default 3)")
    p.add_argument("--n-best", type=beam_size_arg, default=1, metavar="N",
                   help="captions per image, best first (default 1); a larger N than --beam-size widens the beam")
    p.add_argument("--style", help="caption style, e.g. factual, humorous, romantic (default: the model's "
                   "first; see its config.json)")
    p.add_argument("--style-guidance", type=float, metavar="W", help=STYLE_GUIDANCE_HELP)
    p.add_argument("--variants", type=variants_arg, default=1, metavar="N",
                   help="N different captions per image, best first (1 to 10; default 1): the beam's best, "
                   "then other beams and sampled captions that still fit; e.g. more ideas in a style")
    p.add_argument("--json", action="store_true", help="print JSON lines, one per image, for machines")
    p.add_argument("--attention", metavar="PNG", help="save each word's attention map over the image "
                   "(with several images: one file per image, named PNG-STEM.png)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="images captioned together (default 8): faster per image, timing_ms is per batch")
    add_backend(p)
    add_device_option(p)
    p.set_defaults(func=cmd_caption)


def cmd_caption(args) -> int:
    from tqdm import tqdm

    from .data.images import IMAGE_SIZE, IMAGE_SUFFIXES, ImageLoadError, decode_image
    from .model.captioner import Captioner
    from .visualize import attention_figure

    files, folder, empty = _expand(args.images)
    for path in empty:
        print(f"aicrl caption: no images found in {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})",
              file=sys.stderr)
    if not files:
        return 2
    if args.attention and not Path(args.attention).resolve().parent.is_dir():
        print(f"aicrl caption: --attention: the folder {Path(args.attention).parent} does not exist",
              file=sys.stderr)
        return 2
    if args.n_best > args.beam_size:
        print(f"aicrl caption: --n-best {args.n_best} needs a beam that wide: using --beam-size {args.n_best}",
              file=sys.stderr)
        args.beam_size = args.n_best
    captioner = Captioner.from_pretrained(args.model, backend=args.backend, device=args.device)
    if args.style_guidance is not None:
        captioner.config.style_guidance = args.style_guidance
    if args.style and args.style not in captioner.styles:
        sys.exit(f"aicrl: unknown style {args.style!r}; this model knows {', '.join(captioner.styles)}")
    failures = 0
    bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=not folder)
    for i in range(0, len(files), args.batch_size):
        chunk, images = [], []
        for f in files[i:i + args.batch_size]:
            try:
                # as the web app does: the photo upright, whole, not yet squeezed square (the people
                # detectors see it letterboxed, the encoder at 224x224)
                images.append(decode_image(f, max_side=IMAGE_SIZE))
                chunk.append(f)
            except ImageLoadError as e:
                failures += 1
                print(f"aicrl: skipping {e}", file=sys.stderr)
        if images:
            results = captioner.caption(images, args.beam_size, args.n_best, args.style, variants=args.variants)
            for f, image, result in zip(chunk, images, results):
                if args.json:
                    line = {"image": str(f)} | result.to_dict()
                    line["timing_ms"] = line["timing_ms"] | {"batch_images": len(images)}
                    print(json.dumps(line), flush=True)
                else:
                    lines = [c.text for c in result.captions]
                    prefix = f"{f}: " if len(files) > 1 else ""
                    print(prefix + ("\n" + " " * len(prefix)).join(lines), flush=True)
                if args.attention:
                    out = Path(args.attention)
                    if len(files) > 1:
                        out = out.with_name(f"{out.stem}-{f.stem}{out.suffix or '.png'}")
                    best = result.captions[0]
                    attention_figure(image, best.words, best.attention, out, best.text)
        bar.update(len(files[i:i + args.batch_size]))
    bar.close()
    return 1 if failures else 0


def _model_and_dataset(p: argparse.ArgumentParser) -> None:
    """--model, --dataset and --data-dir: the options of the commands that caption a dataset's split."""
    p.add_argument("--model", metavar="DIR", help="model folder (default: the model shipped with the package)")
    p.add_argument("--dataset", choices=["flickr8k", "coco"], default="flickr8k",
                   help="which dataset's layout DATA_DIR has (default flickr8k)")
    p.add_argument("--data-dir", required=True, metavar="DIR", help="dataset folder, e.g. ../shared/data/flickr8k")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model on a test split (BLEU-1..4, METEOR, ROUGE-L, CIDEr)",
                       description="Caption every image of a split with beam search and score the captions "
                       "with the coco-caption toolkit (pycocoevalcap) and NLTK corpus BLEU. With --style "
                       "(and --style-file) it scores styled captions on the style file's dev images: BLEU, "
                       "METEOR, CIDEr against styled references, style accuracy and content overlap. It "
                       "runs the model as `aicrl caption` and the web app do (ONNX Runtime where the folder "
                       "has a valid export), so the scores are the product's; --backend torch for the "
                       "training path.")
    _model_and_dataset(p)
    p.add_argument("--split", default="test", help="train, dev, test or all (every image of the folder; "
                   "for a small sample like coco_mini) (default test)")
    p.add_argument("--chair-synonyms", metavar="FILE", help="CHAIR object synonyms (80 COCO classes) for the "
                   "hallucination measures (default: <data-dir>/../chair/synonyms.txt where it exists)")
    p.add_argument("--features", metavar="DIR",
                   help="feature cache of the same encoder (much faster than reading the images)")
    p.add_argument("--beam-size", type=beam_size_arg, default=3, metavar="K", help="beam width, 1 to 10 (default 3)")
    p.add_argument("--style", help="evaluate this style (needs --style-file); default: factual captions")
    p.add_argument("--style-file", metavar="FILE", help="styled captions jsonl (FlickrStyle7k format)")
    p.add_argument("--length-penalty", type=float, help="override the model's beam length penalty "
                   "(score = logprob / length**penalty); tune it on --split dev")
    p.add_argument("--style-guidance", type=float, metavar="W", help=STYLE_GUIDANCE_HELP)
    p.add_argument("--limit", type=int, default=0, metavar="N", help="only the first N images (default 0 = all)")
    p.add_argument("--out", metavar="FILE", help="also write the results JSON to this file")
    p.add_argument("--captions", metavar="FILE", help="also write every caption, {image: caption} JSON (for "
                   "reading them, or a blind rating: docs/blind_rating.md)")
    p.add_argument("--save-to-model", action="store_true",
                   help="also record the results in the model folder's metrics.json")
    add_backend(p)
    add_device_option(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from .data.datasets import FACTUAL, load_dataset, read_style_jsonl
    from .evaluation import (caption_images, evaluate_factual, evaluate_style, features_source,
                             fit_style_classifier, fluency_scores, people_source)
    from .hallucination import grounding, recording_probabilities, synonyms_path
    from .model.captioner import Captioner, default_model_dir
    from .model.concepts import ConceptTable
    from .model.folder import ModelFolder, metrics_key

    captioner = Captioner.from_pretrained(args.model, backend=args.backend, device=args.device)
    if args.length_penalty is not None:
        captioner.config.length_penalty = args.length_penalty
    if args.style_guidance is not None:
        captioner.config.style_guidance = args.style_guidance
    data = load_dataset(args.dataset, args.data_dir)
    try:  # checked before the long captioning, not after
        synonyms_file = synonyms_path(args.chair_synonyms, args.data_dir)
    except FileNotFoundError as e:
        sys.exit(f"aicrl: {e}")
    features_of = features_source(captioner, data.image_dir, args.features)
    people_of = people_source(captioner, data.image_dir)
    settings = {"model": args.model or "shipped", "backend": captioner.backend, "beam_size": args.beam_size,
                "length_penalty": captioner.config.length_penalty, "style_guidance": captioner.config.style_guidance}
    if args.style and args.style != FACTUAL:
        if not args.style_file:
            sys.exit("aicrl: --style needs --style-file (the styled references)")
        styled = read_style_jsonl(args.style_file, data.image_dir)
        split = "dev" if args.split == "test" else args.split  # FlickrStyle has no test images
        refs = styled.references(split, args.style)
        names = list(refs)[: args.limit or None]
        preds = caption_images(captioner, names, features_of, args.beam_size, args.style, people_of=people_of)
        held_out = styled.select(split) + data.select(split)
        classifier = fit_style_classifier(data, styled)
        result = evaluate_style(preds, refs, data.references(split), args.style, classifier)
        result["classifier_accuracy_on_human_captions"] = classifier.accuracy(
            [r.caption for r in held_out], [r.style for r in held_out])
        # the fluency judge on these captions and on people's (the first reference of each image)
        result["fluency"] = fluency_scores(captioner, preds)
        result["fluency_of_human_captions"] = fluency_scores(captioner, {i: refs[i][0] for i in names})
        settings["split"] = f"FlickrStyle {split}"
    else:
        refs = data.references(args.split)
        names = list(refs)[: args.limit or None]
        probabilities: dict = {}
        features_of = recording_probabilities(features_of, captioner.classifier(), probabilities)
        preds = caption_images(captioner, names, features_of, args.beam_size, people_of=people_of)
        result = evaluate_factual(preds, refs) | {"fluency": fluency_scores(captioner, preds)}
        table = ConceptTable.load(args.model or default_model_dir())
        result["grounding"] = grounding(preds, refs, synonyms_file, probabilities, table)
        settings["split"] = args.split
    result = settings | result | {"examples": dict(list(preds.items())[:5])}
    text = json.dumps(result, indent=2)
    if args.captions:
        Path(args.captions).write_text(json.dumps(preds, indent=1) + "\n")
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.save_to_model:
        folder = ModelFolder(args.model or default_model_dir())
        try:
            folder.merge_metrics({metrics_key(settings["split"], args.style or FACTUAL, args.beam_size): result})
        except ValueError as e:  # a damaged metrics.json: keep it, say so, still print the results
            print(f"aicrl evaluate: --save-to-model: {e}", file=sys.stderr)
            print(text)
            return 1
    print(text)
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write the model's ONNX files (fast inference without torch)",
                       description="Export a model folder to ONNX (encoder, decoder start, one decoder "
                       "step) beside its weights, with onnx.json recording the weights they came from. "
                       "`aicrl caption`, `index` and `serve` then run on ONNX Runtime. Rerun after the "
                       "weights change: a stale export is refused. Needs aicrl[train] (torch).")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the model shipped with the package)")
    p.add_argument("--int8", action="store_true", help="quantize to int8: the encoder statically (calibrated "
                   "on --calibration photos), the decoder step dynamically; faster and smaller, captions change "
                   "for some photos (see the README for its speed and quality here)")
    p.add_argument("--calibration", metavar="DIR", help="with --int8: a folder of photos like the ones you will "
                   "caption (up to 64 are used, each also mirrored)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import export_onnx

    command = "aicrl export" + (f" --model {args.model}" if args.model else "") + (
        f" --int8 --calibration {args.calibration}" if args.int8 else "")
    try:
        manifest = export_onnx(args.model, int8=args.int8, command=command, calibration=args.calibration)
    except ValueError as e:  # --int8 without --calibration photos
        sys.exit(f"aicrl export: {e}")
    print(json.dumps(manifest, indent=2))
    return 0


def _add_fit_phrases(sub) -> None:
    p = sub.add_parser("fit-phrases", help="learn each style's stock phrases, so that decoding avoids them",
                       description="Caption training images in each style, find the word bigrams and trigrams "
                       "that end up in more of the captions than --target and than people use them in that "
                       "style (with --style-file), and save them in the model folder (phrases.json): decoding "
                       "then lowers the logit of the word that would complete one by strength * log(share / "
                       "allowed share). Runs in rounds: once the first stock phrases cost more the model "
                       "reaches for the next ones, which the next round finds.")
    _model_and_dataset(p)
    p.add_argument("--features", metavar="DIR", help="feature cache of the same encoder (much faster)")
    p.add_argument("--style-file", metavar="FILE", help="styled captions jsonl (FlickrStyle7k format): "
                   "people's use of a phrase in a style (train split) is allowed to the model too")
    p.add_argument("--styles", metavar="S,S", help="comma-separated (default: every style but the first)")
    p.add_argument("--images", type=int, default=1500, metavar="N",
                   help="training images captioned per style and round (default 1500)")
    p.add_argument("--rounds", type=int, default=3, metavar="R", help="rounds (default 3)")
    p.add_argument("--target", type=float, default=0.03, metavar="SHARE",
                   help="share of captions below which no phrase costs more (default 0.03)")
    p.add_argument("--strength", type=float, default=1.0, metavar="NATS",
                   help="logit penalty per e-fold of over-use (default 1.0)")
    add_backend(p, default="torch")
    add_device_option(p)
    p.set_defaults(func=cmd_fit_phrases)


def cmd_fit_phrases(args) -> int:
    import random

    from .data.datasets import load_dataset, read_style_jsonl
    from .evaluation import features_source
    from .model.captioner import Captioner, default_model_dir
    from .model.folder import ModelFolder
    from .phrases import fit_phrases

    captioner = Captioner.from_pretrained(args.model, backend=args.backend, device=args.device)
    styles = args.styles.split(",") if args.styles else captioner.styles[1:]
    unknown = set(styles) - set(captioner.styles)
    if unknown or not styles:
        sys.exit(f"aicrl: --styles: this model knows {', '.join(captioner.styles)}")
    data = load_dataset(args.dataset, args.data_dir)
    names = data.images("train")
    random.Random(0).shuffle(names)  # a fixed sample of the training images
    human = None
    if args.style_file:
        records = read_style_jsonl(args.style_file, data.image_dir).select("train")
        human = {s: [r.caption for r in records if r.style == s] for s in styles}
    phrases = fit_phrases(captioner, names[:args.images], features_source(captioner, data.image_dir, args.features),
                          styles, human, args.rounds, args.target, args.strength,
                          log=lambda line: print(line, file=sys.stderr))
    folder = ModelFolder(args.model or default_model_dir())
    phrases.save(folder.path)
    print(json.dumps({"file": str(folder.phrases), "target": phrases.target, "strength": phrases.strength,
                      "phrases": {s: len(t) for s, t in phrases.styles.items()}}))
    return 0


def _add_fit_once(sub) -> None:
    p = sub.add_parser("fit-once", help="learn the words a caption says at most once, so that decoding does not loop on them",
                       description="Count, in human captions (the Flickr8k training captions, and --text-file), "
                       "how often each content word is said twice in one caption, and record in the model's "
                       "vocab.json those said twice in under --max-share of the captions that use them "
                       "(\"kitchen\", \"field\"; not \"man\" or \"white\"). With config mention_once, "
                       "decoding then says each of them at most once (\"a kitchen in a kitchen\" cannot "
                       "happen). `aicrl train` and `aicrl ground` record them already; this is for a model folder "
                       "made before, or more text.")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the model shipped with the package)")
    p.add_argument("--data-dir", required=True, metavar="DIR", help="Flickr8k folder (its train captions)")
    p.add_argument("--text-file", metavar="FILE", help="more human captions, one {\"caption\": ...} per line "
                   "(e.g. the COCO caption text)")
    p.add_argument("--max-share", type=float, default=0.02, metavar="SHARE",
                   help="said twice in fewer than this share of the captions using it (default 0.02)")
    p.add_argument("--min-captions", type=int, default=30, metavar="N",
                   help="only words used by at least N captions (default 30)")
    p.set_defaults(func=cmd_fit_once)


def cmd_fit_once(args) -> int:
    from .data.datasets import load_dataset, read_caption_text
    from .data.vocab import Vocabulary, said_once
    from .model.captioner import default_model_dir
    from .model.folder import ModelFolder

    folder = ModelFolder(args.model or default_model_dir())
    captions = [r.caption for r in load_dataset("flickr8k", args.data_dir).select("train")]
    if args.text_file:
        captions += read_caption_text(args.text_file)
    old = Vocabulary.load(folder.vocab)
    vocab = Vocabulary(old.itos, said_once(captions, args.max_share, args.min_captions))
    vocab.save(folder.vocab)
    print(json.dumps({"file": str(folder.vocab), "captions": len(captions), "said_once": len(vocab.once),
                      "before": len(old.once), "max_share": args.max_share, "min_captions": args.min_captions}))
    return 0

# the commands that need torch (main() says so without it); the first three take their options from
# TrainConfig, in the torch-importing training.py
TORCH_COMMANDS = ("train", "search", "ground", "fit-fluency", "fit-people")


def _add_fit_people(sub) -> None:
    p = sub.add_parser("fit-people", help="fit how the person probe and the person detectors decide together",
                       description="Fit P(person) from the person probe (ImageNet classes) and the person and "
                       "face detectors of people.onnx (aicrl/model/people.py) on Flickr8k training photos, "
                       "where a person is in a photo when most of its captions name one; classes weighted "
                       "evenly. Written into the model folder's person_head.npz: captioning then uses it. "
                       "Needs aicrl[train] (the feature cache, scikit-learn).")
    p.add_argument("--model", metavar="DIR", help="model folder with people.onnx and person_head.npz "
                   "(default: the model shipped with the package)")
    p.add_argument("--data-dir", required=True, metavar="DIR", help="Flickr8k folder (its photos and captions)")
    p.add_argument("--features", required=True, metavar="DIR", help="feature cache of the photos by the model's "
                   "own encoder (aicrl extract-features --model)")
    p.add_argument("--images", type=int, default=2000, metavar="N", help="training photos to fit on, drawn at "
                   "random (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the draw")
    p.set_defaults(func=cmd_fit_people)


def cmd_fit_people(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from .data.datasets import load_dataset
    from .data.images import decode_image
    from .data.features import FeatureCache
    from .grounding import fit_person_mix
    from .model.captioner import Captioner, default_model_dir
    from .model.concepts import imagenet_probabilities

    folder = args.model or default_model_dir()
    captioner = Captioner.from_pretrained(folder)
    people = captioner.people  # loaded with the folder
    if people is None or captioner.person_head is None or captioner.classifier() is None:
        sys.exit(f"aicrl fit-people: {folder} needs people.onnx, person_head.npz and the ImageNet head")
    data = load_dataset("flickr8k", args.data_dir)
    refs = data.references("train")
    names = sorted(refs)
    names = [names[i] for i in np.random.default_rng(args.seed).permutation(len(names))[: args.images]]
    cache = FeatureCache(args.features)
    probe, detections = [], []
    for i in tqdm(range(0, len(names), 100), desc="photos", unit="batch"):
        chunk = names[i:i + 100]
        grids = cache.get(chunk).float().numpy()
        probe.append(captioner.person_head(imagenet_probabilities(captioner.classifier(), grids)))
        detections.append(people([decode_image(data.image_dir / n) for n in chunk]))
    mix, accuracy = fit_person_mix(np.concatenate(probe), np.concatenate(detections), [refs[n] for n in names])
    captioner.person_head.mix = mix
    captioner.person_head.save(folder)
    print(json.dumps({"mix": {"probe": float(mix[0]), "pose": float(mix[1]), "face": float(mix[2]),
                              "bias": float(mix[3])}, "balanced_accuracy": round(accuracy, 4), "images": len(names)}))
    return 0


def _add_fit_fluency(sub) -> None:
    p = sub.add_parser("fit-fluency", help="train the fluency judge that reranks styled captions",
                       description="Train a word-level LSTM language model of human captions on the model's "
                       "vocabulary; its judge of a caption is the caption's weakest word (the lowest SLOR: "
                       "log p(word | the words before) - log p(word)), mapped to P(well-formed) by a logistic "
                       "fit on dev captions against the same captions broken on purpose "
                       "(aicrl/fluency_training.py). Saved in the model folder as fluency.onnx: decoding then "
                       "reranks styled captions and variants by it (config fluency_weight), and `aicrl "
                       "evaluate` reports it. Needs aicrl[train] (torch).")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the model shipped with the package)")
    p.add_argument("--data-dir", required=True, metavar="DIR", help="Flickr8k folder: its train captions "
                   "teach the judge, its dev captions calibrate it")
    p.add_argument("--style-file", metavar="FILE", help="styled captions jsonl (FlickrStyle7k format), split the same "
                   "way; its train captions are seen --style-repeat times an epoch")
    p.add_argument("--style-repeat", type=int, default=3, metavar="N",
                   help="times each styled caption is seen an epoch (default 3: styled captions are fewer)")
    p.add_argument("--text-file", metavar="FILE", help="more human captions, one {\"caption\": ...} per line "
                   "(e.g. the COCO caption text), all for training")
    p.add_argument("--epochs", type=int, default=2, metavar="N", help="epochs over the training captions (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the model, the shuffling and the corruptions")
    p.set_defaults(func=cmd_fit_fluency)


def cmd_fit_fluency(args) -> int:
    import torch

    from .data.datasets import load_dataset, read_caption_text, read_style_jsonl
    from .data.vocab import Vocabulary
    from .fluency_training import export_fluency, fit_fluency
    from .model.captioner import default_model_dir
    from .model.folder import ModelFolder

    folder = ModelFolder(args.model or default_model_dir())
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    data = load_dataset("flickr8k", args.data_dir)
    train = [r.caption for r in data.select("train")]
    dev = [r.caption for r in data.select("dev")]
    if args.style_file:
        styled = read_style_jsonl(args.style_file, data.image_dir)
        train += [r.caption for r in styled.select("train")] * args.style_repeat
        dev += [r.caption for r in styled.select("dev")]
    if args.text_file:
        train += read_caption_text(args.text_file)
    fit = fit_fluency(Vocabulary.load(folder.vocab), train, dev, epochs=args.epochs, seed=args.seed,
                      log=lambda line: print(line, file=sys.stderr))
    export_fluency(fit.net, folder.fluency)
    result = {"fluency_judge": {"dev_perplexity": round(fit.dev_perplexity, 2), "dev_accuracy": round(fit.dev_accuracy, 4),
                                "train_captions": len(train), "dev_captions": len(dev), "epochs": args.epochs,
                                "seconds": round(fit.seconds)}}
    folder.merge_metrics(result)
    print(json.dumps(result | {"file": str(folder.fluency)}, indent=2))
    return 0


def _add_stub(sub, name: str, help: str) -> None:
    """train/search listed by `aicrl --help` without importing torch; parsed for real when used."""
    sub.add_parser(name, help=help, add_help=False)


def build_parser(full: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aicrl", description="AICRL: image captioning with a pretrained CNN encoder and an "
        "attention LSTM decoder. Caption photos, train and evaluate models, serve the web app.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too (to stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_caption, add_serve, add_index, _add_evaluate, _add_export, _add_fit_phrases, _add_fit_once,
                _add_fit_fluency, _add_fit_people):
        add(sub)
    if full:
        _add_train(sub)
        _add_search(sub)
        _add_ground(sub)
    else:
        _add_stub(sub, "train", "train the attention-LSTM decoder on cached features")
        _add_stub(sub, "search", "run the paper's hyperparameter grid on a small budget")
        _add_stub(sub, "ground", GROUND_HELP)
    _add_extract(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    full = wanted in TORCH_COMMANDS
    if full:
        from .model.captioner import torch_available

        if not torch_available():
            sys.exit(f"aicrl {wanted} needs torch: pip install 'aicrl[train]'")
    args = build_parser(full).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .runtime import BackendUnavailable, OnnxModelError

    try:
        return args.func(args) or 0
    except (OnnxModelError, BackendUnavailable) as e:  # a broken or stale export, a missing package
        sys.exit(f"aicrl: {e}")


if __name__ == "__main__":
    sys.exit(main())
