"""The routes of the web app: each one short, its limits and answers declared (schemas.py); the
work is in the CaptionService (service.py) and the Gallery (gallery.py)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response

from ..data.images import ImageLoadError, ImageTooLargeError
from .batching import ServerBusy
from .gallery import ID_PATTERN
from .schemas import (BLANK_PATTERN, MAX_BEAM, MAX_QUERY_CHARS, MAX_REFERENCES_TEXT, MAX_SEARCH_LIMIT,
                      MAX_SEARCH_OFFSET, MAX_STYLE_CHARS, MAX_VARIANTS, WORD_PATTERN, BleuRequest, BleuResponse,
                      CaptionResponse, GalleryItem, Health, ModelCard, SearchResponse, errors)
from .service import CaptionJob, ReferencesError, bleu_scores, reference_lines

router = APIRouter()

ImageId = Annotated[str, PathParam(pattern=ID_PATTERN, description="gallery id: 32 hex digits")]
JPEG = {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
        "description": "the JPEG"}
NO_IMAGE = "No image with this id."


def _served(request: Request):
    return request.app.state.served


def _busy(e: ServerBusy, what: str) -> JSONResponse:
    return JSONResponse({"detail": f"The server is busy {what}; try again in {e.retry_after} s."},
                        status_code=503, headers={"retry-after": str(e.retry_after)})


@router.get("/", include_in_schema=False)
async def index(request: Request) -> Response:
    return Response(_served(request).index_html, media_type="text/html; charset=utf-8",
                    headers={"cache-control": "no-cache"})


@router.get("/healthz", tags=["meta"], summary="Liveness check", response_model=Health)
async def healthz(request: Request) -> dict:
    served = _served(request)
    return {"status": "ok", "model": served.card["model"], "queue": served.service.batcher.in_flight}


@router.get("/api/info", tags=["meta"], response_model=ModelCard,
            summary="Model card: summary, architecture, training data, scores, limitations, latency, limits")
async def info(request: Request) -> dict:
    served = _served(request)
    batcher = served.service.batcher
    latency = served.service.stats.summary() | {"batches": batcher.batches, "largest_batch": batcher.largest_batch}
    return served.card | {"latency": latency, "gallery_images": await asyncio.to_thread(served.gallery.count),
                          "limits": served.limits | {"queue_capacity": batcher.capacity}}


@router.post("/api/captions", tags=["captions"], summary="Caption an image (and keep it in the gallery)",
             response_model=CaptionResponse, response_model_exclude_unset=True,
             responses=errors(400, 403, 413, 415, 422, busy=True))
async def create_captions(
    request: Request,
    image: Annotated[UploadFile, File(description="the photo: JPEG, PNG, GIF, WebP, BMP or TIFF, at most 20 MB "
                                                  "and 64 million pixels", json_schema_extra={"minLength": 1})],
    beam_size: Annotated[int, Form(ge=1, le=MAX_BEAM, description="beam width k")] = 3,
    n_best: Annotated[int | None, Form(ge=1, le=MAX_BEAM, description="captions to return, at most beam_size "
                                                                       "(more give beam_size; default: all k)")] = None,
    style: Annotated[str | None, Form(max_length=MAX_STYLE_CHARS,
                                      description="caption style; default the model's first")] = None,
    variants: Annotated[int, Form(ge=1, le=MAX_VARIANTS, description="that many different captions, best first, "
                                                                     "instead of the beam's n_best")] = 1,
    references: Annotated[str | None, Form(
        max_length=MAX_REFERENCES_TEXT, json_schema_extra={"pattern": f"{BLANK_PATTERN}|{WORD_PATTERN}"},
        description="reference captions, one per line (the lines with a letter or digit): adds BLEU")] = None,
) -> dict:
    started = time.perf_counter()
    served = _served(request)
    await _refuse_repeated_fields(request)  # every field is checked before anything is captioned
    job = CaptionJob(await _upload_bytes(image, served.limits["max_upload_bytes"]), beam_size,
                     min(n_best or beam_size, beam_size), _style(style, served.styles), variants,
                     _references(references))
    try:
        out = await served.service.caption(job)
    except ServerBusy as e:
        return _busy(e, "captioning other images")
    except ImageTooLargeError as e:
        raise HTTPException(413, f"Cannot use this image: {e}.") from e
    except ImageLoadError as e:
        raise HTTPException(400, f"Cannot read this image: {e}.") from e
    record = out.record
    body = {"id": record["id"], "image_url": record["image_url"], "thumbnail_url": record["thumbnail_url"],
            "created": record["created"], "style": out.style, "beam_size": beam_size, "captions": out.captions,
            "tags": out.tags, "attention": out.attention,
            "timing_ms": out.timing | {"server": round((time.perf_counter() - started) * 1000, 1)}}
    return body | ({"bleu": out.bleu} if out.bleu is not None else {})


async def _upload_bytes(image: UploadFile, limit: int) -> bytes:
    content_type = (image.content_type or "").split(";")[0].strip().lower()
    if content_type and not (content_type.startswith("image/") or content_type == "application/octet-stream"):
        raise HTTPException(415, f"Expected an image file (JPEG, PNG, ...), got content type {content_type!r}.")
    data = await image.read(limit + 1)
    await image.close()
    if len(data) > limit:
        raise HTTPException(413, upload_too_large(limit))
    if not data:
        raise HTTPException(400, "The uploaded file is empty.")
    return data


def upload_too_large(limit: int) -> str:
    return f"The upload is larger than the limit of {limit // (1024 * 1024)} MB."


def _style(style: str | None, styles: list[str]) -> str:
    if style is None:
        return styles[0]
    if style not in styles:
        raise HTTPException(422, f"Unknown style {style!r}; this model knows: {', '.join(styles)}.")
    return style


def _references(value: list[str] | str | None, required: bool = False) -> list[str]:
    try:
        return reference_lines(value, required)
    except ReferencesError as e:
        raise HTTPException(422, str(e)) from e


CAPTION_FIELDS = ("image", "beam_size", "n_best", "style", "variants", "references")


async def _refuse_repeated_fields(request: Request) -> None:
    """A field sent twice would be read as its last value: refused (other fields are ignored)."""
    form = await request.form()  # already parsed for the parameters: no second read
    repeated = [key for key in CAPTION_FIELDS if len(form.getlist(key)) > 1]
    if repeated:
        raise HTTPException(422, f"Send each field once; repeated: {', '.join(repeated)}.")


@router.post("/api/bleu", tags=["captions"], summary="BLEU-1..4 of a caption against reference captions",
             response_model=BleuResponse,
             responses=errors(400, 403, 413, 415, 422, busy=True, meanings={400: "the body is not JSON"}))
async def bleu(request: Request, body: BleuRequest) -> dict | JSONResponse:
    refs = _references(body.references, required=True)
    try:  # CPU work: off the event loop. The inputs are not echoed back.
        scores = await _served(request).scorer.run(bleu_scores, body.candidate, refs)
    except ServerBusy as e:
        return _busy(e, "scoring other captions")
    return {"bleu": scores, "references_used": len(refs)}


@router.get("/api/search", tags=["gallery"], summary="Search the gallery's captions and tags (FTS5, bm25)",
            response_model=SearchResponse, response_model_exclude_unset=True, responses=errors(422))
async def search(request: Request,
                 q: Annotated[str, Query(max_length=MAX_QUERY_CHARS,
                                         description="words; empty: the latest images")] = "",
                 limit: Annotated[int, Query(ge=1, le=MAX_SEARCH_LIMIT)] = 24,
                 offset: Annotated[int, Query(ge=0, le=MAX_SEARCH_OFFSET)] = 0) -> dict:
    results, match = await asyncio.to_thread(_served(request).gallery.search, q, limit, offset)
    return {"query": q, "match": match, "count": len(results), "results": results}


@router.get("/api/images/{image_id}", tags=["gallery"], summary="A stored image (JPEG)",
            response_class=FileResponse, responses={200: JPEG} | errors(404, 422))
async def get_image(request: Request, image_id: ImageId) -> FileResponse:
    return _image_file(_served(request).gallery.image_path(image_id))


@router.get("/api/images/{image_id}/thumbnail", tags=["gallery"], summary="A stored image's thumbnail (JPEG)",
            response_class=FileResponse, responses={200: JPEG} | errors(404, 422))
async def get_thumbnail(request: Request, image_id: ImageId) -> FileResponse:
    return _image_file(_served(request).gallery.thumbnail_path(image_id))


def _image_file(path: Path) -> FileResponse:
    if not path.is_file():
        raise HTTPException(404, NO_IMAGE)
    return FileResponse(path, media_type="image/jpeg", headers={"cache-control": "public, max-age=86400, immutable"})


@router.get("/api/images/{image_id}/details", tags=["gallery"], response_model=GalleryItem,
            response_model_exclude_unset=True,
            responses=errors(404, 422),
            summary="A gallery item: its captions per style (with the best one's attention), tags, dates")
async def get_details(request: Request, image_id: ImageId) -> dict:
    record = await asyncio.to_thread(_served(request).gallery.get, image_id, True)
    if record is None:
        raise HTTPException(404, NO_IMAGE)
    return record


@router.delete("/api/images/{image_id}", tags=["gallery"], status_code=204, response_class=Response,
               responses=errors(403, 404, 422),
               summary="Remove a gallery item: its image files, its row and its search entry")
async def delete_image(request: Request, image_id: ImageId) -> Response:
    if not await asyncio.to_thread(_served(request).gallery.delete, image_id):
        raise HTTPException(404, NO_IMAGE)
    return Response(status_code=204)
