"""The `aicrl serve` and `aicrl index` subcommands (registered by aicrl/cli.py)."""
from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import time
from pathlib import Path

from ..config import BACKENDS, MAX_BEAM_SIZE, MAX_VARIANTS
from ..data.images import image_files
from ..devices import add_device_option

log = logging.getLogger(__name__)

DEFAULT_DB = "data/gallery.db"
MAX_FILE_BYTES = 100 * 1024 * 1024  # `aicrl index` skips bigger files instead of reading them


def add_backend(p, default: str = "auto") -> None:
    p.add_argument("--backend", choices=BACKENDS, default=default,
                   help="run the model on ONNX Runtime (fast, no torch; needs the model's `aicrl export` "
                        "files), on its int8 graphs (faster still, slightly different captions; `aicrl export "
                        "--int8`) or on torch; auto: ONNX when the model folder has them" + f" (default {default})")


def _whole_number(text: str, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= high:
        raise argparse.ArgumentTypeError(f"must be from 1 to {high}, not {value}")
    return value


def beam_size_arg(text: str) -> int:
    """argparse type of beam widths: the one limit the page, the API and the commands share."""
    return _whole_number(text, MAX_BEAM_SIZE)


def variants_arg(text: str) -> int:
    """argparse type of --variants: the limit the API shares."""
    return _whole_number(text, MAX_VARIANTS)


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="run the web app: caption photos in the browser, search the gallery",
        description="Serve the captioning page and its REST API (FastAPI + uvicorn). Open "
        "http://127.0.0.1:8000 in a browser: choose or drop a photo, press Captionize. Every captioned "
        "photo is kept in the gallery (SQLite database, images in an 'images' folder beside it), which "
        "the Query tab searches. API schema: /openapi.json.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0 opens it to "
                        "your network, and with it the gallery)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    p.add_argument("--db", default=DEFAULT_DB, metavar="FILE",
                   help=f"gallery database; images go in an 'images' folder beside it (default {DEFAULT_DB})")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the model shipped in the package)")
    p.add_argument("--max-queue-s", type=float, default=3.0, metavar="S",
                   help="queue as many photos as the server captions in S seconds (measured as it runs); "
                        "past that, HTTP 503 with Retry-After (default 3)")
    p.add_argument("--max-waiting", type=int, default=16, metavar="N",
                   help="the queue holds at least N photos, however slow the machine (default 16)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip captioning a test image at start (faster start, slower first request)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="caption up to N concurrent requests together in one batch (default 16; 1: one at a time)")
    add_backend(p)
    add_device_option(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import uvicorn

    from .app import create_app

    try:
        app = create_app(model_dir=args.model, db_path=args.db, max_waiting=args.max_waiting, max_queue_s=args.max_queue_s,
                         warmup=not args.no_warmup, backend=args.backend, max_batch=args.max_batch,
                         device=args.device)
    except FileNotFoundError as e:
        print(f"aicrl serve: cannot load the model: {e}. Pass --model DIR with a trained model folder.",
              file=sys.stderr)
        return 2
    except ImportError as e:  # e.g. --backend torch without torch installed
        print(f"aicrl serve: cannot load the model: {e}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this address can caption images and see the "
                    "gallery", args.host)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"AICRL: open http://{shown}:{args.port} (gallery: {args.db}); Ctrl+C stops.", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0


def add_index(sub) -> None:
    p = sub.add_parser(
        "index", help="caption every image of a folder into the gallery",
        description="Caption every image file of FOLDER (.jpg .jpeg .png .gif .webp .bmp .tif .tiff) and "
        "store it in the gallery that `aicrl serve` searches, with its ImageNet tags. Files already in "
        "the gallery with captions in this style (same content, by SHA-256) are skipped and counted as "
        "already_indexed, so rerunning only adds new photos; files with the same content as another file of "
        "this run are counted as skipped_duplicates; another --style adds that style's captions to the same "
        "gallery items. Unreadable files are reported and skipped. Progress goes to stderr; a JSON summary to "
        "stdout. A gallery that cannot be written (a full disk) stops the run with exit status 1; what was "
        "indexed before stays.")
    p.add_argument("folder", help="folder of images to caption")
    p.add_argument("--db", default=DEFAULT_DB, metavar="FILE", help=f"gallery database (default {DEFAULT_DB})")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the model shipped in the package)")
    p.add_argument("--recursive", "-r", action="store_true", help="also index images in subfolders")
    p.add_argument("--beam-size", type=beam_size_arg, default=3, metavar="K", help="beam width, 1 to 10 (default 3)")
    p.add_argument("--style", help="caption style (default: the model's first, factual)")
    add_backend(p)
    add_device_option(p)
    p.set_defaults(func=cmd_index)


def index_folder(folder: str | Path, db_path: str | Path = DEFAULT_DB, captioner=None,
                 model_dir: str | Path | None = None, recursive: bool = False, beam_size: int = 3,
                 style: str | None = None, progress: bool = True, backend: str = "auto",
                 device: str = "auto") -> dict:
    """Caption the images of `folder` into the gallery at `db_path`; returns a summary dict."""
    from tqdm import tqdm

    from ..data.images import ImageLoadError
    from .gallery import Gallery, open_image, sha256_bytes

    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    if captioner is None:
        from ..model.captioner import Captioner

        captioner = Captioner.from_pretrained(model_dir, backend=backend, device=device)
    style = style or captioner.styles[0]
    if style not in captioner.styles:
        raise ValueError(f"unknown style {style!r}; this model knows {captioner.styles}")
    gallery = Gallery(db_path)
    images = image_files(folder, recursive)
    others = sum(p.is_file() and not p.name.startswith(".") for p in folder.glob("**/*" if recursive else "*"))
    summary = {"folder": str(folder), "db": str(db_path), "found": len(images), "indexed": 0,
               "already_indexed": 0, "skipped_duplicates": 0, "unreadable": [], "ignored_files": others - len(images)}
    seen: set[str] = set()
    start = time.perf_counter()
    # closed on every way out, so an error message starts on its own line
    with tqdm(images, desc="indexing", unit="img", file=sys.stderr, disable=not progress) as bar:
        for path in bar:
            name = str(path.relative_to(folder))
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    raise ImageLoadError(f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MB")
                data = path.read_bytes()
                digest = sha256_bytes(data)
                if digest in seen:  # the same content as a file before it in this run
                    summary["skipped_duplicates"] += 1
                    continue
                seen.add(digest)
                if gallery.has_caption(digest, style):  # indexed by an earlier run (or the server)
                    summary["already_indexed"] += 1
                    continue
                image = open_image(data)
                result = captioner.caption([data], beam_size=beam_size, n_best=beam_size, style=style)[0]
            except (ImageLoadError, OSError) as e:
                summary["unreadable"].append({"file": name, "error": str(e)})
                bar.write(f"skipping {name}: {e}", file=sys.stderr)
                continue
            gallery.add(image, [c.to_dict() for c in result.captions], result.style, digest, source=name,
                        tags=result.tags)
            summary["indexed"] += 1
    seconds = time.perf_counter() - start
    summary["seconds"] = round(seconds, 2)
    summary["images_per_second"] = round(summary["indexed"] / seconds, 2) if seconds > 0 else None
    summary["gallery_images"] = gallery.count()
    return summary


def cmd_index(args) -> int:
    try:
        summary = index_folder(args.folder, args.db, model_dir=args.model, recursive=args.recursive,
                               beam_size=args.beam_size, style=args.style, backend=args.backend,
                               device=args.device)
    except (NotADirectoryError, FileNotFoundError, ValueError) as e:
        print(f"aicrl index: {e}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as e:  # a full disk, a read-only folder: the photos read fine
        # Gallery.add writes an item's files and its row all or nothing: what is indexed stays whole.
        print(f"aicrl index: cannot write the gallery {args.db}: {e}; the images indexed before this "
              "one are kept", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
