"""The web app: a FastAPI server with the captioning page (static files) and a small REST API.

    create_app(model_dir=None, db_path="data/gallery.db", captioner=None, ...) -> FastAPI

The model is loaded once, when the app is created (ONNX Runtime when the model folder has an export,
else torch). Inference runs off the event loop, in one worker thread that captions concurrent
requests together, up to `max_batch` per model call (service.py, batching.py). Requests wait in a
queue bounded by the work it holds (what the server captions in `max_queue_s` seconds, at least
`max_waiting` requests); past that the server answers 503 with Retry-After instead of queueing
without bound (and memory with it).
Request bodies are size-limited while they are read (middleware.py), images over `MAX_PIXELS` are
refused before they are decoded, every field is validated before anything is captioned or stored,
and every bad input is a 4xx JSON error `{"detail": "..."}` with nothing stored. The limits and
every answer are declared in the OpenAPI schema (schemas.py).

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

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.images import MAX_PIXELS
from .batching import BoundedWorker
from .card import VERSION, model_card
from .gallery import Gallery
from .middleware import BodyLimit, BodyLimitMiddleware, SecurityHeadersMiddleware
from .routes import router, upload_too_large
from .schemas import (MAX_BEAM, MAX_JSON_BYTES, MAX_REFERENCE_CHARS, MAX_REFERENCES, MAX_REFERENCES_TEXT,
                      MAX_UPLOAD_BYTES, MAX_VARIANTS)
from .service import CaptionService

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small form fields around the image


@dataclass
class Served:
    """What the routes use, kept on `app.state.served`."""
    service: CaptionService
    gallery: Gallery
    scorer: BoundedWorker  # BLEU, off the event loop
    card: dict
    limits: dict
    index_html: bytes

    @property
    def styles(self) -> list[str]:
        return list(self.service.captioner.styles)


def create_app(model_dir: str | Path | None = None, db_path: str | Path = "data/gallery.db",
               captioner=None, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_waiting: int = 16,
               max_queue_s: float = 3.0, warmup: bool = False, backend: str = "auto", max_batch: int = 16,
               batch_wait_ms: float = 5.0, device: str = "auto") -> FastAPI:
    """Build the app. `captioner` (already loaded) wins over `model_dir`; with neither, the shipped
    model is loaded on `backend` (auto: ONNX Runtime when the folder has an export) and `device`
    (torch only). `warmup` runs the model on a synthetic image at start (the first real request is
    then as fast as the next ones, the Info tab has a latency and the queue a time per image from
    the start). Up to `max_batch` concurrent requests are captioned in one model call, gathered for
    at most `batch_wait_ms`; as many as the server captions in `max_queue_s` seconds (at least
    `max_waiting`) wait for their turn, more get 503."""
    from ..model.captioner import Captioner, default_model_dir

    model_dir = Path(model_dir) if model_dir else (None if captioner is not None else default_model_dir())
    if captioner is None:
        captioner = Captioner.from_pretrained(model_dir, backend=backend, device=device)
    gallery = Gallery(db_path)
    service = CaptionService(captioner, gallery, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                             max_waiting=max_waiting, max_queue_s=max_queue_s)
    if warmup:
        service.warm_up()
    limits = {"max_upload_bytes": max_upload_bytes, "max_pixels": MAX_PIXELS, "max_beam_size": MAX_BEAM,
              "max_variants": MAX_VARIANTS, "max_references": MAX_REFERENCES,
              "max_reference_chars": MAX_REFERENCE_CHARS, "max_references_text": MAX_REFERENCES_TEXT,
              "max_batch": max_batch, "max_waiting": max_waiting, "max_queue_s": max_queue_s}
    served = Served(service, gallery, BoundedWorker(max_waiting=16, name="aicrl-bleu"),
                    model_card(captioner, model_dir), limits, (STATIC_DIR / "index.html").read_bytes())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.shutdown()
        served.scorer.shutdown()

    app = FastAPI(title="AICRL", version=VERSION, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Image captioning with an attention LSTM decoder: caption photos, "
                              "search the gallery of captioned photos, score captions with BLEU.")
    app.state.served = served
    app.state.captioner, app.state.gallery, app.state.stats = captioner, gallery, service.stats
    app.state.runner = service.batcher
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.openapi = lambda: _openapi(app, served.styles)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimitMiddleware, limits={
        "/api/captions": BodyLimit(max_upload_bytes + _FORM_OVERHEAD, "multipart/form-data",
                                   "Send the image as multipart/form-data with the file in the field 'image'.",
                                   upload_too_large(max_upload_bytes)),
        "/api/bleu": BodyLimit(MAX_JSON_BYTES, "application/json", "Send the request as application/json.",
                               f"The request is larger than the limit of {MAX_JSON_BYTES // 1024} KiB."),
    })
    app.add_middleware(SecurityHeadersMiddleware)
    return app


# --- errors: every one is {"detail": ...} ---

async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems, parts = [], []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form")]
        name = ".".join(loc) or "request"
        msg = str(err.get("msg", "invalid value"))
        parts.append(f"{name}: {msg}")
        problems.append({"field": name, "msg": msg, "type": err.get("type")})
    return JSONResponse({"detail": "; ".join(parts), "errors": problems}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() != "allow"}
    if exc.status_code == 405:  # name every method of the path, not only those of the first route
        headers["allow"] = ", ".join(_allowed_methods(request))
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=headers)
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    path = request.url.path
    return sorted({method for route in router.routes if route.path_regex.match(path) for method in route.methods})


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "Internal server error; the server keeps running. Try again or report it."},
                        status_code=500)


# --- the schema ---

def _openapi(app: FastAPI, styles: list[str]) -> dict:
    """FastAPI's schema, with what it cannot know: the model's styles, and form fields that are
    optional but never null (a form has no null)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for component in schema.get("components", {}).get("schemas", {}).values():
        if component.get("title", "").startswith("Body_create_captions"):
            for name, prop in component["properties"].items():
                branches = [b for b in prop.pop("anyOf", []) if b.get("type") != "null"]
                if branches:
                    prop.update(branches[0])
                if name == "style":
                    prop["enum"] = styles
    app.openapi_schema = schema
    return schema
