"""The web app: a FastAPI server with the captioning page (static files) and a small REST API.

    create_app(model_dir=None, db_path="data/gallery.db", captioner=None, ...) -> FastAPI

The model is loaded once, when the app is created (ONNX Runtime when the model folder has an export,
else torch). Inference runs off the event loop, in one worker thread that captions concurrent
requests together, up to `max_batch` per model call (micro-batching, aicrl/serving/batching.py); at
most `max_waiting` wait for the next batch, beyond that the server answers 503 at once instead of
queueing without bound (and memory with it).
Request bodies are size-limited while they are read (`BodyLimitMiddleware`), images over
`MAX_PIXELS` are refused before they are decoded, every field is validated before anything is
captioned or stored, and every bad input is a 4xx JSON error `{"detail": "..."}` with nothing stored.
CPU work (the model, BLEU, database queries) runs off the event loop, so /healthz stays quick.

API
    GET  /                      the page (static HTML/CSS/JS, no CDN)
    POST /api/captions          multipart: image (file), beam_size, n_best, style, variants, references
    GET  /api/search?q=words    gallery search of captions and tags (FTS5, bm25); no words: the latest
    GET  /api/images/{id}       a stored image (JPEG); /api/images/{id}/thumbnail its thumbnail
    GET  /api/images/{id}/details   a gallery item: captions per style, tags, dates (JSON)
    DELETE /api/images/{id}     remove a gallery item (files, row and search entry)
    GET  /api/info              model card: summary, architecture, training, scores, limits, latency
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Callable
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..data.images import MAX_PIXELS, ImageLoadError, ImageTooLargeError
from ..data.vocab import tokenize
from ..evaluation import sentence_bleu
from ..config import MAX_BEAM_SIZE, MAX_VARIANTS
from ..model.captioner import GRID
from .batching import MicroBatcher, ServerBusy
from .card import VERSION, model_card
from .gallery import ID_PATTERN, Gallery, open_image, sha256_bytes

log = logging.getLogger(__name__)


STATIC_DIR = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_BEAM = MAX_BEAM_SIZE
MAX_REFERENCES = 20
MAX_REFERENCE_CHARS = 2000  # one reference caption (and the candidate)
MAX_REFERENCES_TEXT = 20_000  # the references as one string, one per line
MAX_JSON_BYTES = 64 * 1024  # /api/bleu: room for the longest valid request, with JSON escapes
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

ImageId = Annotated[str, PathParam(pattern=ID_PATTERN, description="gallery id: 32 hex digits")]


class InferenceRunner:
    """One worker thread for CPU work (the model; BLEU), with a bounded number of requests waiting
    for it. One thread, not a pool: Python threads busy with CPU work hold the GIL in turns, and
    the event loop would wait behind every one of them."""

    def __init__(self, max_waiting: int = 4, name: str = "aicrl-inference"):
        self.capacity = max_waiting + 1  # one running + max_waiting queued
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self._in_flight >= self.capacity:
                raise ServerBusy()
            self._in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            with self._lock:
                self._in_flight -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


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


class BodyTooLarge(HTTPException):
    def __init__(self, detail: str):
        super().__init__(413, detail)


class BodyLimit:
    """What a POST to one path may send: a content type, and at most `max_bytes` of body."""

    def __init__(self, max_bytes: int, content_type: str, wrong_type: str, too_large: str):
        self.max_bytes, self.content_type, self.wrong_type, self.too_large = max_bytes, content_type, wrong_type, too_large


class BodyLimitMiddleware:
    """For POSTs to the paths of `limits`: refuse a body over its limit (by Content-Length before
    reading anything, and by counting bytes as they arrive for chunked bodies) or of another type."""

    def __init__(self, app, limits: dict[str, BodyLimit]):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        limit = self.limits.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if limit is None:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not headers.get("content-type", "").lower().startswith(limit.content_type):
            return await _send_json(send, 415, limit.wrong_type)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit.max_bytes):
            return await _send_json(send, 413, limit.too_large)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    raise BodyTooLarge(limit.too_large)  # FastAPI turns it into the 413 response
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
    candidate: str = Field(max_length=MAX_REFERENCE_CHARS, description="the caption to score")
    references: (Annotated[list[Annotated[str, Field(max_length=MAX_REFERENCE_CHARS)]],
                           Field(max_length=MAX_REFERENCES * 5)]
                 | Annotated[str, Field(max_length=MAX_REFERENCES_TEXT)]) = Field(
        description=f"reference captions: a list, or one string with one caption per line; at most "
                    f"{MAX_REFERENCES} non-empty ones of at most {MAX_REFERENCE_CHARS} characters each")


def _references(value: list[str] | str | None) -> list[str]:
    """The reference captions that have words: 422 when there are too many, or when some were
    given but none has a word (checked before anything is captioned or stored)."""
    if value is None:
        return []
    lines = value.splitlines() if isinstance(value, str) else value
    given = [line.strip() for line in lines if line and line.strip()]
    if len(given) > MAX_REFERENCES:
        raise HTTPException(422, f"Give at most {MAX_REFERENCES} reference captions.")
    if any(len(line) > MAX_REFERENCE_CHARS for line in given):
        raise HTTPException(422, f"A reference caption can have at most {MAX_REFERENCE_CHARS} characters.")
    refs = [line for line in given if tokenize(line)]
    if given and not refs:
        raise HTTPException(422, "references: give at least one reference caption with words in it.")
    return refs


def _bleu(candidate: str, refs: list[str]) -> dict[str, float]:
    try:
        return {k: round(v, 4) for k, v in sentence_bleu(candidate, refs).items()}
    except ValueError as e:
        raise HTTPException(422, f"references: {e}") from e


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
    model is loaded on `backend` (auto: ONNX Runtime when the folder has an export) and `device`
    (torch only). `warmup` runs the model on a synthetic image at start (the first real request is
    then as fast as the next ones, and the Info tab has a latency from the start). Up to `max_batch`
    concurrent requests are captioned in one model call, gathered for at most `batch_wait_ms`."""
    from ..model.captioner import Captioner, default_model_dir

    model_dir = Path(model_dir) if model_dir else (None if captioner is not None else default_model_dir())
    if captioner is None:
        captioner = Captioner.from_pretrained(model_dir, backend=backend, device=device)
    gallery = Gallery(db_path)
    scorer = InferenceRunner(max_waiting=16, name="aicrl-bleu")
    stats = LatencyStats()
    card = model_card(captioner, model_dir)
    index_html = (STATIC_DIR / "index.html").read_bytes()

    def caption_image(data: bytes, beam_size: int, n_best: int, style: str, store: bool,
                      measure: bool = True, refs: list[str] | None = None, variants: int = 1) -> dict:
        """Runs in the worker thread: validate, caption, store (and BLEU against `refs`)."""
        out = caption_batch([(data, beam_size, n_best, style, store, measure, refs, variants)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def caption_batch(jobs: list[tuple]) -> list:
        """Runs in the worker thread: per job (data, beam_size, n_best, style, store, measure, refs,
        variants) a dict, or the ImageLoadError of its image. Jobs with the same beam size, style and
        variants share one call."""
        out: list = [None] * len(jobs)
        images, groups = {}, defaultdict(list)
        for i, (data, beam_size, _, style, *_rest, variants) in enumerate(jobs):
            try:
                images[i] = open_image(data)  # raises ImageLoadError before anything is stored
                groups[beam_size, style, variants].append(i)
            except ImageLoadError as e:
                out[i] = e
        for (beam_size, style, variants), members in groups.items():
            n_best = max(jobs[i][2] for i in members)
            # Caption from the bytes, as `aicrl caption` does (JPEG draft decoding straight to 224 px),
            # so the web page and the command line give the same caption for the same file.
            try:
                results = captioner.caption([jobs[i][0] for i in members], beam_size=beam_size,
                                            n_best=n_best, style=style, variants=variants)
            except ImageLoadError:  # one bad image must not fail its companions: one by one
                results = []
                for i in members:
                    try:
                        results.append(captioner.caption([jobs[i][0]], beam_size=beam_size, n_best=n_best,
                                                         style=style, variants=variants)[0])
                    except ImageLoadError as e:
                        results.append(e)
            for i, result in zip(members, results):
                out[i] = result if isinstance(result, Exception) else _finish(jobs[i], images[i], result)
        return out

    def _finish(job: tuple, image, result) -> dict:
        data, _, n_best, _, store, measure, refs, variants = job
        timing = dict(result.timing_ms)
        timing["model"] = round(timing.get("encode", 0.0) + timing.get("decode", 0.0), 1)
        if measure:
            stats.add(timing)
        captions = [c.to_dict() for c in result.captions[:max(n_best, variants)]]
        best = result.captions[0]
        attention = {"words": list(best.words), "weights": [list(r) for r in best.attention], "grid": GRID}
        record = (gallery.add(image, captions, result.style, sha256_bytes(data), tags=result.tags,
                              attention=attention) if store else None)
        return {"record": record, "captions": captions, "style": result.style, "tags": result.tags,
                "timing": timing, "attention": attention, "bleu": _bleu(best.text, refs) if refs else None}

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
        scorer.shutdown()

    app = FastAPI(title="AICRL", version=VERSION, docs_url=None, redoc_url=None, lifespan=lifespan,
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

    @app.get("/api/info", tags=["meta"], summary="Model card: summary, architecture, training data, scores, "
             "limitations, latency, limits")
    async def info() -> dict:
        return card | {"latency": stats.summary() | {"batches": runner.batches, "largest_batch": runner.largest_batch},
                       "gallery_images": await run_in_threadpool(gallery.count),
                       "limits": {"max_upload_bytes": max_upload_bytes, "max_pixels": MAX_PIXELS,
                                  "max_beam_size": MAX_BEAM, "max_variants": MAX_VARIANTS, "max_references": MAX_REFERENCES,
                                  "max_reference_chars": MAX_REFERENCE_CHARS, "max_batch": max_batch,
                                  "max_waiting": max_waiting}}

    @app.post("/api/captions", tags=["captions"], summary="Caption an image (and keep it in the gallery)",
              responses={400: {"description": "not a readable image"}, 413: {"description": "too large"},
                         415: {"description": "not an image upload"}, 422: {"description": "bad parameters"},
                         503: {"description": "server busy"}})
    async def create_captions(
        request: Request,
        image: Annotated[UploadFile, File(description="the photo: JPEG, PNG, GIF, WebP, BMP or TIFF, "
                                                      "at most 20 MB")],
        beam_size: Annotated[int, Form(ge=1, le=MAX_BEAM, description="beam width k")] = 3,
        n_best: Annotated[int | None, Form(ge=1, le=MAX_BEAM,
                                           description="captions to return, at most beam_size (default: all k)")] = None,
        style: Annotated[str | None, Form(max_length=64, description="caption style (see /api/info); "
                                                                     "default the model's first, factual")] = None,
        variants: Annotated[int, Form(ge=1, le=MAX_VARIANTS, description="that many different captions, best "
                                                                         "first, instead of the beam's n_best")] = 1,
        references: Annotated[str | None, Form(max_length=MAX_REFERENCES_TEXT,
                                               description="reference captions, one per line: adds BLEU")] = None,
    ) -> JSONResponse:
        # Every field is checked here, before the image is captioned or stored.
        started = time.perf_counter()
        form = await request.form()  # already parsed for the parameters above: no second read
        repeated = sorted({key for key in form.keys() if len(form.getlist(key)) > 1})
        if repeated:
            raise HTTPException(422, f"Send each field once; repeated: {', '.join(repeated)}.")
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
            out = await runner.submit((data, beam_size, n_best, style, True, True, refs, variants))
        except ServerBusy:
            return _error(503, "The server is busy captioning other images; try again in a few seconds.",
                          {"retry-after": "5"})
        except ImageTooLargeError as e:
            raise HTTPException(413, f"Cannot use this image: {e}.") from e
        except ImageLoadError as e:
            raise HTTPException(400, f"Cannot read this image: {e}.") from e
        record = out["record"]
        body = {"id": record["id"], "image_url": record["image_url"], "thumbnail_url": record["thumbnail_url"],
                "created": record["created"], "style": out["style"], "beam_size": beam_size,
                "captions": out["captions"], "tags": out["tags"], "attention": out["attention"]}
        if out["bleu"] is not None:
            body["bleu"] = out["bleu"]
        body["timing_ms"] = out["timing"] | {"server": round((time.perf_counter() - started) * 1000, 1)}
        return JSONResponse(body)

    @app.post("/api/bleu", tags=["captions"], summary="BLEU-1..4 of a caption against reference captions",
              responses={413: {"description": "body over 64 KiB"}, 415: {"description": "not JSON"},
                         422: {"description": "bad fields"}, 503: {"description": "server busy"}})
    async def bleu(request: BleuRequest) -> dict:
        refs = _references(request.references)
        # Scoring is CPU work: off the event loop. The inputs are not echoed back.
        try:
            scores = await scorer.run(_bleu, request.candidate, refs)
        except ServerBusy:
            return _error(503, "The server is busy scoring other captions; try again in a few seconds.",
                          {"retry-after": "2"})
        return {"bleu": scores, "references_used": len(refs)}

    @app.get("/api/search", tags=["gallery"], summary="Search the gallery's captions and tags (FTS5, bm25)")
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

    @app.get("/api/images/{image_id}/details", tags=["gallery"],
             summary="A gallery item: its captions per style (with the best one's attention), tags, dates")
    async def get_details(image_id: ImageId) -> dict:
        record = await run_in_threadpool(gallery.get, image_id, True)
        if record is None:
            raise HTTPException(404, "No image with this id.")
        return record

    @app.delete("/api/images/{image_id}", tags=["gallery"], status_code=204,
                summary="Remove a gallery item: its image files, its row and its search entry")
    async def delete_image(image_id: ImageId) -> Response:
        if not await run_in_threadpool(gallery.delete, image_id):
            raise HTTPException(404, "No image with this id.")
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimitMiddleware, limits={
        "/api/captions": BodyLimit(max_upload_bytes + _FORM_OVERHEAD, "multipart/form-data",
                                   "Send the image as multipart/form-data with the file in the field 'image'.",
                                   UploadTooLarge(max_upload_bytes).detail),
        "/api/bleu": BodyLimit(MAX_JSON_BYTES, "application/json", "Send the request as application/json.",
                               f"The request is larger than the limit of {MAX_JSON_BYTES // 1024} KiB."),
    })
    app.add_middleware(SecurityHeadersMiddleware)
    return app


def _image_file(path: Path) -> FileResponse:
    if not path.is_file():
        raise HTTPException(404, "No image with this id.")
    return FileResponse(path, media_type="image/jpeg",
                        headers={"cache-control": "public, max-age=86400, immutable"})
