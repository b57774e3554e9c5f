"""What the web API takes and gives: its limits, the request and response models, and the error
answers each route declares, so that /openapi.json says what the server really does."""
from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ..config import MAX_BEAM_SIZE, MAX_VARIANTS

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_BEAM = MAX_BEAM_SIZE
MAX_REFERENCES = 20  # in the JSON list form of /api/bleu
MAX_REFERENCE_CHARS = 2000  # one reference caption in the list form (and the candidate)
MAX_REFERENCES_TEXT = 20_000  # the references as one string, one per line
MAX_QUERY_CHARS = 200
MAX_SEARCH_LIMIT = 100
MAX_SEARCH_OFFSET = 100_000
MAX_STYLE_CHARS = 64
# /api/bleu: the longest valid request, every character JSON-escaped as a surrogate pair
# (12 bytes), fits: the schema's length limits count characters, the body limit counts bytes.
MAX_JSON_BYTES = 512 * 1024

# A reference caption is one with a word: an ASCII letter or digit (what the tokenizer keeps).
# The schema and the server use the same two patterns, so they agree on every string.
WORD_PATTERN = "[A-Za-z0-9]"
BLANK_PATTERN = "^[ \t\r\n]*$"
WORD = re.compile(WORD_PATTERN)
BLANK = re.compile(BLANK_PATTERN)


class ValidationProblem(BaseModel):
    field: str = Field(description="the field, dotted: `references.3`; `request` for the whole body")
    msg: str
    type: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: a message for people, and for 422 each field that is wrong."""
    detail: str
    errors: list[ValidationProblem] | None = Field(default=None, description="422 only: the fields at fault")


class CaptionOut(BaseModel):
    text: str
    score: float = Field(description="the beam's ranking score (higher is better)")
    confidence: float | None = Field(default=None, ge=0, le=1, description=(
        "how far the caption agrees with what the encoder sees (1: it names every confident concept and "
        "nothing the encoder rules out); absent for a model without a concept table"))
    unsupported: list[str] | None = Field(default=None, description="things the caption names that the encoder rules out")
    missed: list[str] | None = Field(default=None, description="confident concepts the caption leaves out")


class Tag(BaseModel):
    label: str = Field(description="an ImageNet class")
    probability: float = Field(ge=0, le=1)


class Attention(BaseModel):
    words: list[str]
    weights: list[list[float]] = Field(description="per word, grid x grid weights over the photo, row by row")
    grid: int


class Bleu(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    bleu_1: float = Field(alias="BLEU-1", ge=0, le=1)
    bleu_2: float = Field(alias="BLEU-2", ge=0, le=1)
    bleu_3: float = Field(alias="BLEU-3", ge=0, le=1)
    bleu_4: float = Field(alias="BLEU-4", ge=0, le=1)
    bleu: float = Field(alias="BLEU", ge=0, le=1, description="BLEU-4")


class CaptionResponse(BaseModel):
    id: str
    image_url: str
    thumbnail_url: str
    created: str
    style: str
    beam_size: int
    captions: list[CaptionOut] = Field(description="best first")
    tags: list[Tag]
    attention: Attention = Field(description="of the best caption")
    bleu: Bleu | None = Field(default=None, description="only with `references`")
    timing_ms: dict[str, float]


class StyleEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    captions: list[CaptionOut]
    created: str
    attention: Attention | None = Field(default=None, description="/details only")


class GalleryItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    captions: list[CaptionOut]
    style: str
    styles: dict[str, StyleEntry] = Field(description="the newest captions of each style")
    tags: list[Tag]
    source: str | None
    width: int
    height: int
    created: str
    updated: str
    image_url: str
    thumbnail_url: str


class SearchResponse(BaseModel):
    query: str
    match: str = Field(description="`all` words, `any` word, or `recent` (no words)")
    count: int
    results: list[GalleryItem]


class Health(BaseModel):
    status: str
    model: str
    queue: int = Field(description="caption requests waiting or being captioned")


class ModelCard(BaseModel):
    """The model card; its facts come from the model folder, so only the frame is fixed here."""
    model_config = ConfigDict(extra="allow")
    model: str
    summary: list[str]
    styles: list[str]
    latency: dict[str, Any]
    gallery_images: int
    limits: dict[str, int | float]


References = (Annotated[list[Annotated[str, Field(max_length=MAX_REFERENCE_CHARS)]],
                        Field(max_length=MAX_REFERENCES, json_schema_extra={"contains": {"pattern": WORD_PATTERN}})]
              | Annotated[str, Field(max_length=MAX_REFERENCES_TEXT, json_schema_extra={"pattern": WORD_PATTERN})])


class BleuRequest(BaseModel):
    candidate: str = Field(max_length=MAX_REFERENCE_CHARS, description="the caption to score")
    references: References = Field(
        description=f"reference captions: a list of at most {MAX_REFERENCES} of at most {MAX_REFERENCE_CHARS} "
                    f"characters each, or one string of at most {MAX_REFERENCES_TEXT:,} characters with one per "
                    "line; at least one with a word (a letter or digit); the others are ignored")


class BleuResponse(BaseModel):
    bleu: Bleu
    references_used: int


def errors(*statuses: int, busy: bool = False, meanings: dict[int, str] | None = None) -> dict[int | str, dict]:
    """The `responses` of a route: each status with its meaning (`meanings` overrides the usual
    one) and the error model."""
    meanings = ERROR_MEANINGS | (meanings or {})
    out: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": meanings[status]} for status in statuses}
    if busy:
        out[503] = {"model": ErrorResponse, "description": ERROR_MEANINGS[503],
                    "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}}
    return out


ERROR_MEANINGS = {
    400: "not a readable image",
    403: "a request from another site's page",
    404: "no image with this id",
    413: "the upload or the image is too large",
    415: "the body is not of the expected type",
    422: "a field is missing, out of range or sent twice",
    503: "the server is busy; try again after Retry-After seconds",
}
