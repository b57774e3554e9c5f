"""The web app: a FastAPI server with the captioning page (static files) and a small REST API.

    create_app(model_dir=None, db_path="data/gallery.db", captioner=None, ...) -> FastAPI

The model is loaded once, when the app is created (ONNX Runtime when the model folder has an export,
else torch). Inference runs off the event loop, in one worker thread that captions concurrent
requests together, up to `max_batch` per model call (micro-batching, aicrl/serving/batching.py); at
most `max_waiting` wait for the next batch, beyond that the server answers 503 at once instead of
queueing without bound (and memory with it).
Uploads are size-limited while they are read (`UploadLimitMiddleware`), images over
`MAX_PIXELS` are refused before they are decoded, and every bad input is a 4xx JSON error
`{"detail": "..."}` with nothing stored.

API
    GET  /                      the page (static HTML/CSS/JS, no CDN)
    POST /api/captions          multipart: image (file), beam_size, n_best, style, references
    GET  /api/search?q=words    gallery search (SQLite FTS5, bm25); no words: the latest images
    GET  /api/images/{id}       a stored image (JPEG); /api/images/{id}/thumbnail its thumbnail
    GET  /api/info              model card: architecture, styles, metrics.json, latency, limits
    POST /api/bleu              {"candidate": "...", "references": ["...", ...]} -> BLEU-1..4
    GET  /healthz               liveness
    GET  /openapi.json          the OpenAPI schema (no interactive docs: they would need a CDN)
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import statistics
import threading
import time
from collections import defaultdict, deque
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field

from ..data.images import MAX_PIXELS, ImageLoadError, ImageTooLargeError
from ..evaluation import sentence_bleu
from ..model.captioner import GRID
from .batching import MicroBatcher, ServerBusy
from .gallery import ID_PATTERN, Gallery, open_image, sha256_bytes

log = logging.getLogger(__name__)

try:
    _version = metadata.version("aicrl")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    _version = "0+unknown"

STATIC_DIR = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_BEAM = 10
MAX_REFERENCES = 20
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small form fields around the image

SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
                               "style-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}

LIMITATIONS = [
    "Trained on Flickr8k: 8,000 everyday photos, mostly people and dogs outdoors. Other subjects "
    "(food, objects, indoor scenes, space, drawings, text, medical images) get generic or wrong captions.",
    "The vocabulary is only the words of its training captions; it cannot name anything it never read about.",
    "The photo is squashed to 224x224 pixels, so small details are lost, and the attention map is a coarse "
    "7x7 grid: it shows where the decoder looked, not a proof of why it chose a word.",
    "Captions can repeat the biases of their human-written training captions (for example guessing "
    "gender or age from appearance).",
    "English only. BLEU against your reference captions counts shared words and phrases, not meaning.",
]
STYLE_LIMITATION = ("The styles other than factual were learnt from FlickrStyle7k (7,000 images with humorous "
                    "and romantic captions): styled captions are less accurate and less fluent than factual ones, "
                    "and often end in a stock phrase of their style (\"to impress his lover\", \"like a fish\").")


ImageId = Annotated[str, PathParam(pattern=ID_PATTERN, description="gallery id: 32 hex digits")]


class LatencyStats:
    """Timings of the last requests, for the model card."""

    def __init__(self, size: int = 200):
        self._rows: deque[dict] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, timing: dict) -> None:
        with self._lock:
            self._rows.append(dict(timing))

    def summary(self) -> dict:
        with self._lock:
            rows = list(self._rows)
        if not rows:
            return {"count": 0}
        out: dict[str, Any] = {"count": len(rows)}
        for key in ("encode", "decode", "model"):
            values = [r[key] for r in rows if key in r]
            if values:
                out[f"{key}_ms_median"] = round(statistics.median(values), 1)
        return out


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class UploadTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"The upload is larger than the limit of {limit // (1024 * 1024)} MB.")


class UploadLimitMiddleware:
    """For POST to the upload path: refuse a body over `max_bytes` (by Content-Length, and by
    counting bytes as they arrive for chunked uploads), and a body that is not multipart/form-data."""

    def __init__(self, app, path: str, max_bytes: int, file_limit: int):
        self.app, self.path, self.max_bytes, self.file_limit = app, path, max_bytes, file_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return await _send_json(send, 415, "Send the image as multipart/form-data with the file in the "
                                    "field 'image'.")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _send_json(send, 413, UploadTooLarge(self.file_limit).detail)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise UploadTooLarge(self.file_limit)  # FastAPI turns it into the 413 response
            return message

        await self.app(scope, limited_receive, send)


class SecurityHeadersMiddleware:
    def __init__(self, app, same_origin_posts: bool = True):
        self.app, self.same_origin_posts = app, same_origin_posts
        self._headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.same_origin_posts and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            # A page on another site (or a DNS-rebound name) must not post to this server.
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            origin, host = headers.get("origin"), headers.get("host", "")
            if origin and origin != "null" and urlsplit(origin).netloc != host:
                return await _send_json(send, 403, "Cross-origin requests are not allowed.")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in self._headers if k not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BleuRequest(BaseModel):
    candidate: str = Field(max_length=2000, description="the caption to score")
    references: list[Annotated[str, Field(max_length=2000)]] | str = Field(
        description="reference captions: a list, or one string with one caption per line")


def _references(value: list[str] | str | None) -> list[str]:
    if value is None:
        return []
    lines = value.splitlines() if isinstance(value, str) else value
    refs = [line.strip() for line in lines if line and line.strip()]
    if len(refs) > MAX_REFERENCES:
        raise HTTPException(422, f"Give at most {MAX_REFERENCES} reference captions.")
    return refs


def _bleu(candidate: str, refs: list[str]) -> dict[str, float]:
    try:
        return {k: round(v, 4) for k, v in sentence_bleu(candidate, refs).items()}
    except ValueError as e:
        raise HTTPException(422, f"references: {e}") from e


def model_card(captioner, model_dir: Path | None) -> dict:
    """What the Info tab shows, from the model's config, metrics.json and COMMAND.txt."""
    cfg = captioner.config
    metrics: dict = {}
    command = None
    if model_dir is not None:
        metrics_file = model_dir / "metrics.json"
        if metrics_file.is_file():
            try:
                metrics = json.loads(metrics_file.read_text())
            except (OSError, ValueError) as e:
                log.warning("cannot read %s: %s", metrics_file, e)
        command_file = model_dir / "COMMAND.txt"
        if command_file.is_file():
            command = command_file.read_text().strip()[:4000]
    styles = list(captioner.styles)
    try:
        params = captioner.parameter_counts()
    except Exception:  # noqa: BLE001  (a stand-in captioner in tests)
        params = {}
    training = ("Flickr8k (8,000 photos, 5 captions each; 6,000 for training)"
                + ("; styles from FlickrStyle7k (humorous and romantic captions)" if len(styles) > 1 else ""))
    return {
        "name": "AICRL image captioner",
        "version": _version,
        "backend": getattr(captioner, "backend", "torch"),
        "model": model_dir.name if model_dir else None,
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
        "training_data": metrics.get("dataset") if isinstance(metrics.get("dataset"), str) else training,
        "styles": styles,
        "default_style": styles[0],
        "metrics": metrics,
        "command": command,
        "config": asdict(cfg),
        "limitations": LIMITATIONS + ([STYLE_LIMITATION] if len(styles) > 1 else []),
    }


def _clean_validation_errors(errors: list[dict]) -> tuple[str, list[dict]]:
    clean, parts = [], []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form")]
        field = ".".join(loc) or "request"
        msg = str(err.get("msg", "invalid value"))
        parts.append(f"{field}: {msg}")
        clean.append({"field": field, "msg": msg, "type": err.get("type")})
    return "; ".join(parts), clean


def create_app(model_dir: str | Path | None = None, db_path: str | Path = "data/gallery.db",
               captioner=None, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_waiting: int = 16,
               warmup: bool = False, backend: str = "auto", max_batch: int = 16,
               batch_wait_ms: float = 5.0, device: str = "auto") -> FastAPI:
    """Build the app. `captioner` (already loaded) wins over `model_dir`; with neither, the shipped
    model is loaded on `backend` (auto: ONNX Runtime when the folder has an export). `warmup` runs
    the model on a synthetic image at start (the first real request is then as fast as the next ones,
    and the Info tab has a latency from the start). Up to `max_batch` concurrent requests are
    captioned in one model call, gathered for at most `batch_wait_ms`. `device` places a torch model (see devices.resolve_device)."""
    from ..model.captioner import Captioner, default_model_dir

    model_dir = Path(model_dir) if model_dir else (None if captioner is not None else default_model_dir())
    if captioner is None:
        captioner = Captioner.from_pretrained(model_dir, backend=backend, device=device)
    gallery = Gallery(db_path)
    stats = LatencyStats()
    card = model_card(captioner, model_dir)
    index_html = (STATIC_DIR / "index.html").read_bytes()

    def caption_image(data: bytes, beam_size: int, n_best: int, style: str, store: bool,
                      measure: bool = True) -> dict:
        """Runs in the worker thread: validate, caption, store."""
        return caption_batch([(data, beam_size, n_best, style, store, measure)])[0]

    def caption_batch(jobs: list[tuple]) -> list:
        """Runs in the worker thread: a dict per job (data, beam_size, n_best, style, store, measure),
        or the ImageLoadError of its image. Jobs with the same beam size and style share one call."""
        out: list = [None] * len(jobs)
        images, groups = {}, defaultdict(list)
        for i, (data, beam_size, _, style, _, _) in enumerate(jobs):
            try:
                images[i] = open_image(data)  # raises ImageLoadError before anything is stored
                groups[beam_size, style].append(i)
            except ImageLoadError as e:
                out[i] = e
        for (beam_size, style), members in groups.items():
            n_best = max(jobs[i][2] for i in members)
            # Caption from the bytes, as `aicrl caption` does (JPEG draft decoding straight to 224 px),
            # so the web page and the command line give the same caption for the same file.
            try:
                results = captioner.caption([jobs[i][0] for i in members], beam_size=beam_size,
                                            n_best=n_best, style=style)
            except ImageLoadError:  # one bad image must not fail its companions: one by one
                results = []
                for i in members:
                    try:
                        results.append(captioner.caption([jobs[i][0]], beam_size=beam_size, n_best=n_best,
                                                         style=style)[0])
                    except ImageLoadError as e:
                        results.append(e)
            for i, result in zip(members, results):
                out[i] = result if isinstance(result, Exception) else _finish(jobs[i], images[i], result)
        return out

    def _finish(job: tuple, image, result) -> dict:
        data, _, n_best, _, store, measure = job
        timing = dict(result.timing_ms)
        timing["model"] = round(timing.get("encode", 0.0) + timing.get("decode", 0.0), 1)
        if measure:
            stats.add(timing)
        captions = [{"text": c.text, "score": round(float(c.score), 4)} for c in result.captions[:n_best]]
        record = gallery.add(image, captions, result.style, sha256_bytes(data)) if store else None
        best = result.captions[0]
        return {"record": record, "captions": captions, "style": result.style, "timing": timing,
                "attention": {"words": list(best.words), "weights": [list(r) for r in best.attention],
                              "grid": GRID}}

    runner = MicroBatcher(caption_batch, max_batch=max_batch, max_wait_ms=batch_wait_ms, max_waiting=max_waiting)

    if warmup:
        buf = io.BytesIO()
        Image.radial_gradient("L").convert("RGB").save(buf, "PNG")
        for first in (True, False):  # the first run pays one-time costs: not counted
            caption_image(buf.getvalue(), 3, 1, None, store=False, measure=not first)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        runner.shutdown()

    app = FastAPI(title="AICRL", version=_version, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Image captioning with an attention LSTM decoder: caption photos, "
                              "search the gallery of captioned photos, score captions with BLEU.")
    app.state.captioner, app.state.gallery, app.state.runner, app.state.stats = captioner, gallery, runner, stats

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        detail, errors = _clean_validation_errors(exc.errors())
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "Internal server error; the server keeps running. Try again or report it.")

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(index_html, media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})

    @app.get("/healthz", tags=["meta"], summary="Liveness check")
    async def healthz() -> dict:
        return {"status": "ok", "model": card["model"], "queue": runner.in_flight}

    @app.get("/api/info", tags=["meta"], summary="Model card: architecture, styles, metrics, latency, limits")
    async def info() -> dict:
        return card | {"latency": stats.summary() | {"batches": runner.batches, "largest_batch": runner.largest_batch},
                       "gallery_images": gallery.count(),
                       "limits": {"max_upload_bytes": max_upload_bytes, "max_pixels": MAX_PIXELS,
                                  "max_beam_size": MAX_BEAM, "max_references": MAX_REFERENCES,
                                  "max_batch": max_batch, "max_waiting": max_waiting}}

    @app.post("/api/captions", tags=["captions"], summary="Caption an image (and keep it in the gallery)",
              responses={400: {"description": "not a readable image"}, 413: {"description": "too large"},
                         415: {"description": "not an image upload"}, 422: {"description": "bad parameters"},
                         503: {"description": "server busy"}})
    async def create_captions(
        image: Annotated[UploadFile, File(description="the photo: JPEG, PNG, GIF, WebP, BMP or TIFF, "
                                                      "at most 20 MB")],
        beam_size: Annotated[int, Form(ge=1, le=MAX_BEAM, description="beam width k")] = 3,
        n_best: Annotated[int | None, Form(ge=1, le=MAX_BEAM,
                                           description="captions to return, at most beam_size (default: all k)")] = None,
        style: Annotated[str | None, Form(max_length=64, description="caption style (see /api/info); "
                                                                     "default the model's first, factual")] = None,
        references: Annotated[str | None, Form(max_length=20000,
                                               description="reference captions, one per line: adds BLEU")] = None,
    ) -> JSONResponse:
        started = time.perf_counter()
        n_best = beam_size if n_best is None else n_best
        if n_best > beam_size:
            raise HTTPException(422, f"n_best ({n_best}) cannot be larger than beam_size ({beam_size}).")
        style = style.strip() if style and style.strip() else captioner.styles[0]
        if style not in captioner.styles:
            raise HTTPException(422, f"Unknown style {style!r}; this model knows: {', '.join(captioner.styles)}.")
        refs = _references(references)
        content_type = (image.content_type or "").split(";")[0].strip().lower()
        if content_type and not (content_type.startswith("image/") or content_type == "application/octet-stream"):
            raise HTTPException(415, f"Expected an image file (JPEG, PNG, ...), got content type {content_type!r}.")
        data = await image.read(max_upload_bytes + 1)
        await image.close()
        if len(data) > max_upload_bytes:
            raise UploadTooLarge(max_upload_bytes)
        if not data:
            raise HTTPException(400, "The uploaded file is empty.")
        try:
            out = await runner.submit((data, beam_size, n_best, style, True, True))
        except ServerBusy:
            return _error(503, "The server is busy captioning other images; try again in a few seconds.",
                          {"retry-after": "5"})
        except ImageTooLargeError as e:
            raise HTTPException(413, f"Cannot use this image: {e}.") from e
        except ImageLoadError as e:
            raise HTTPException(400, f"Cannot read this image: {e}.") from e
        best = out["captions"][0]["text"] if out["captions"] else ""
        timing = out["timing"] | {"server": round((time.perf_counter() - started) * 1000, 1)}
        body = {"id": out["record"]["id"], "image_url": out["record"]["image_url"],
                "thumbnail_url": out["record"]["thumbnail_url"], "created": out["record"]["created"],
                "style": out["style"], "beam_size": beam_size, "captions": out["captions"],
                "attention": out["attention"], "timing_ms": timing}
        if refs:
            body["bleu"] = _bleu(best, refs)
        return JSONResponse(body)

    @app.post("/api/bleu", tags=["captions"], summary="BLEU-1..4 of a caption against reference captions")
    async def bleu(request: BleuRequest) -> dict:
        refs = _references(request.references)
        return {"candidate": request.candidate, "references": refs, "bleu": _bleu(request.candidate, refs)}

    @app.get("/api/search", tags=["gallery"], summary="Search the gallery's captions (FTS5, bm25)")
    async def search(q: Annotated[str, Query(max_length=200, description="words; empty: the latest images")] = "",
                     limit: Annotated[int, Query(ge=1, le=100)] = 24,
                     offset: Annotated[int, Query(ge=0, le=100_000)] = 0) -> dict:
        results, match = await asyncio.to_thread(gallery.search, q, limit, offset)
        return {"query": q, "match": match, "count": len(results), "results": results}

    @app.get("/api/images/{image_id}", tags=["gallery"], summary="A stored image (JPEG)",
             response_class=FileResponse)
    async def get_image(image_id: ImageId):
        return _image_file(gallery.image_path(image_id))

    @app.get("/api/images/{image_id}/thumbnail", tags=["gallery"], summary="A stored image's thumbnail (JPEG)",
             response_class=FileResponse)
    async def get_thumbnail(image_id: ImageId):
        return _image_file(gallery.thumbnail_path(image_id))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(UploadLimitMiddleware, path="/api/captions", max_bytes=max_upload_bytes + _FORM_OVERHEAD,
                       file_limit=max_upload_bytes)
    app.add_middleware(SecurityHeadersMiddleware)
    return app


def _image_file(path: Path) -> FileResponse:
    if not path.is_file():
        raise HTTPException(404, "No image with this id.")
    return FileResponse(path, media_type="image/jpeg",
                        headers={"cache-control": "public, max-age=86400, immutable"})
