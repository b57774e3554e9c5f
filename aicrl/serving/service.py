"""Captioning for the web app: a request becomes a CaptionJob; the CaptionService captions
concurrent jobs together (micro-batching, batching.py), stores the photos in the gallery, and
keeps the latency the model card shows. BLEU scoring of references lives here too."""
from __future__ import annotations

import io
import statistics
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..data.images import ImageLoadError
from ..evaluation import sentence_bleu
from ..model.captioner import GRID
from .batching import MicroBatcher
from .gallery import Gallery, open_image, sha256_bytes
from .schemas import BLANK, MAX_REFERENCE_CHARS, MAX_REFERENCES, WORD


class ReferencesError(ValueError):
    """Reference captions the server cannot score with (the route answers 422)."""


@dataclass(frozen=True)
class CaptionJob:
    """One photo to caption, with the request's settings (validated by the route)."""
    data: bytes  # the upload's bytes: captioned as `aicrl caption` would caption the file
    beam_size: int = 3
    n_best: int = 3
    style: str | None = None  # None: the model's first
    variants: int = 1
    references: list[str] = field(default_factory=list)  # non-empty: BLEU of the best caption
    store: bool = True  # keep the photo and its captions in the gallery
    measure: bool = True  # count its timing in the model card's latency

    @property
    def group(self) -> tuple[int, str | None, int]:
        """Jobs with the same group share one model call."""
        return self.beam_size, self.style, self.variants


@dataclass
class CaptionOutcome:
    captions: list[dict]
    style: str
    tags: list[dict]
    attention: dict
    timing: dict[str, float]
    record: dict | None = None  # the gallery item (None when not stored)
    bleu: dict[str, float] | None = None


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


def reference_lines(value: list[str] | str | None, required: bool = False) -> list[str]:
    """The reference captions to score against: the lines (or list items) with a word in them.
    Blank or missing: none (unless `required`). Given, but none has a word, or too many or too long
    list items: ReferencesError. The same rules as the schema's (schemas.py)."""
    if not required and (value is None or (isinstance(value, str) and BLANK.match(value))):
        return []
    lines = value.splitlines() if isinstance(value, str) else (value or [])
    if not isinstance(value, str):
        if len(lines) > MAX_REFERENCES:
            raise ReferencesError(f"Give at most {MAX_REFERENCES} reference captions.")
        if any(len(line) > MAX_REFERENCE_CHARS for line in lines):
            raise ReferencesError(f"A reference caption can have at most {MAX_REFERENCE_CHARS} characters.")
    refs = [line.strip() for line in lines if WORD.search(line)]
    if not refs:
        raise ReferencesError("references: give at least one reference caption with words in it.")
    return refs


def bleu_scores(candidate: str, references: list[str]) -> dict[str, float]:
    """BLEU-1..4 of `candidate` against references that have words (see reference_lines)."""
    return {k: round(v, 4) for k, v in sentence_bleu(candidate, references).items()}


class CaptionService:
    """Captions jobs in one worker thread, up to `max_batch` per model call, with a queue bounded by
    the work it holds (see MicroBatcher); stores each photo in the gallery."""

    def __init__(self, captioner, gallery: Gallery, *, max_batch: int = 16, batch_wait_ms: float = 5.0,
                 max_waiting: int = 16, max_queue_s: float = 3.0):
        self.captioner, self.gallery, self.stats = captioner, gallery, LatencyStats()
        self.batcher = MicroBatcher(self.caption_batch, max_batch=max_batch, max_wait_ms=batch_wait_ms,
                                    max_waiting=max_waiting, max_queue_s=max_queue_s)

    async def caption(self, job: CaptionJob) -> CaptionOutcome:
        """Caption off the event loop, with companions; raises ServerBusy when the queue is full,
        ImageLoadError (or its ImageTooLargeError) for an unreadable image."""
        return await self.batcher.submit(job)

    def caption_now(self, job: CaptionJob) -> CaptionOutcome:
        """Caption in this thread (at start, before requests come)."""
        out = self.caption_batch([job])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def warm_up(self) -> None:
        """Caption a synthetic photo twice: the first run pays one-time costs (not counted), the
        second gives the Info tab a latency and the queue a time per image from the start."""
        buf = io.BytesIO()
        Image.radial_gradient("L").convert("RGB").save(buf, "PNG")
        for first in (True, False):
            started = time.perf_counter()
            self.caption_now(CaptionJob(buf.getvalue(), store=False, measure=not first))
        self.batcher.observe(time.perf_counter() - started, 1)

    def caption_batch(self, jobs: list[CaptionJob]) -> list[CaptionOutcome | Exception]:
        """Runs in the worker thread: per job its outcome, or the ImageLoadError of its image."""
        out: list[CaptionOutcome | Exception | None] = [None] * len(jobs)
        images: dict[int, Image.Image] = {}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            try:
                images[i] = open_image(job.data)  # raises ImageLoadError before anything is stored
                groups[job.group].append(i)
            except ImageLoadError as e:
                out[i] = e
        for members in groups.values():
            for i, result in zip(members, self._caption_group([jobs[i] for i in members])):
                out[i] = result if isinstance(result, Exception) else self._finish(jobs[i], images[i], result)
        return out  # type: ignore[return-value]

    def _caption_group(self, jobs: list[CaptionJob]) -> list:
        """One model call for jobs of one group. Captioned from the bytes, as `aicrl caption` does
        (JPEG draft decoding straight to 224 px), so the page and the command line agree."""
        settings = dict(beam_size=jobs[0].beam_size, n_best=max(j.n_best for j in jobs), style=jobs[0].style,
                        variants=jobs[0].variants)
        try:
            return self.captioner.caption([j.data for j in jobs], **settings)
        except ImageLoadError:  # one bad image must not fail its companions: one by one
            results: list = []
            for job in jobs:
                try:
                    results.append(self.captioner.caption([job.data], **settings)[0])
                except ImageLoadError as e:
                    results.append(e)
            return results

    def _finish(self, job: CaptionJob, image: Image.Image, result) -> CaptionOutcome:
        timing = dict(result.timing_ms)
        timing["model"] = round(timing.get("encode", 0.0) + timing.get("decode", 0.0), 1)
        if job.measure:
            self.stats.add(timing)
        captions = [c.to_dict() for c in result.captions[:max(job.n_best, job.variants)]]
        best = result.captions[0]
        attention = {"words": list(best.words), "weights": [list(r) for r in best.attention], "grid": GRID}
        record = (self.gallery.add(image, captions, result.style, sha256_bytes(job.data), tags=result.tags,
                                   attention=attention) if job.store else None)
        bleu = bleu_scores(best.text, job.references) if job.references else None
        return CaptionOutcome(captions, result.style, result.tags, attention, timing, record, bleu)

    def shutdown(self) -> None:
        self.batcher.shutdown()
