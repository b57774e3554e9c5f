"""The gallery: every captioned image, its captions and style, in SQLite with an FTS5 caption index.

Layout (a data folder):
    gallery.db          SQLite database (WAL mode): table `images` and the FTS5 table `captions_fts`
    images/<id>.jpg     the stored image (EXIF orientation applied, metadata stripped, longest side
                        at most `MAX_SIDE` px, JPEG)
    images/<id>.thumb.jpg   a thumbnail (longest side `THUMB_SIDE` px)

Images are addressed only by their generated id (32 hex digits, `ID_PATTERN`), never by a client path.
Files are written atomically (a temp file in the same folder, then `os.replace`) before the rows are
inserted in one transaction, so a row never points at a missing or half-written file.
Every SQL statement is parameterised; search terms are quoted before they reach FTS5's query syntax.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import tempfile
import uuid
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..data.images import decode_image

ID_PATTERN = r"^[0-9a-f]{32}$"
_ID_RE = re.compile(ID_PATTERN)
MAX_SIDE = 1600
THUMB_SIDE = 320
_TERM = re.compile(r"[\w']+", re.UNICODE)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id       TEXT PRIMARY KEY,
    sha256   TEXT NOT NULL,          -- of the original bytes: `aicrl index` skips files seen before
    source   TEXT,                   -- file name for `aicrl index`, NULL for uploads
    style    TEXT NOT NULL,
    captions TEXT NOT NULL,          -- JSON list of {"text", "score"}, best first
    width    INTEGER NOT NULL,
    height   INTEGER NOT NULL,
    created  TEXT NOT NULL           -- ISO 8601, UTC
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
CREATE INDEX IF NOT EXISTS images_created ON images (created);
CREATE VIRTUAL TABLE IF NOT EXISTS captions_fts USING fts5 (
    id UNINDEXED, best, others, tokenize = 'porter unicode61'
);
"""
# bm25 column weights (id, best caption, other beam candidates): the best caption counts more.
_BM25 = "bm25(captions_fts, 0.0, 2.0, 1.0)"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def valid_id(image_id: str) -> bool:
    return bool(_ID_RE.fullmatch(image_id or ""))


def open_image(data: bytes) -> Image.Image:
    """Decode uploaded bytes for storage: RGB, upright, at most about MAX_SIDE px (fast for big JPEGs)."""
    return decode_image(data, max_side=MAX_SIDE)


def _jpeg(image: Image.Image, side: int, quality: int) -> bytes:
    image = image.copy()
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fts_query(text: str) -> str | None:
    """User words -> an FTS5 query that matches all of them (each quoted: no FTS5 syntax gets through).
    None when there is no word in `text`."""
    terms = [t.strip("'") for t in _TERM.findall(text.lower())]
    terms = [t for t in terms if t][:16]
    return " ".join('"' + t.replace('"', '""') + '"' for t in terms) or None


class Gallery:
    """Captioned images in a SQLite database, with an images folder beside it."""

    def __init__(self, db_path: str | os.PathLike):
        self.db_path = Path(db_path)
        self.image_dir = self.db_path.parent / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe from any thread (the server's worker,
        # the event loop, a concurrent `aicrl index`).
        with closing(sqlite3.connect(self.db_path, timeout=30)) as conn:
            conn.row_factory = sqlite3.Row
            with conn:  # a transaction: commit on success, rollback on error
                yield conn

    # --- writing ---

    def add(self, image: Image.Image, captions: list[dict], style: str, sha256: str,
            source: str | None = None) -> dict:
        """Store an RGB image (resized, re-encoded as JPEG) and its captions; returns the record."""
        image_id = uuid.uuid4().hex
        full, thumb = self.image_path(image_id), self.thumbnail_path(image_id)
        stored = _jpeg(image, MAX_SIDE, 90)
        _write_atomic(full, stored)
        try:
            _write_atomic(thumb, _jpeg(image, THUMB_SIDE, 82))
            caps = [{"text": str(c["text"]), "score": round(float(c["score"]), 4)} for c in captions]
            width, height = Image.open(io.BytesIO(stored)).size
            created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            with self._connect() as conn:
                conn.execute("INSERT INTO images (id, sha256, source, style, captions, width, height, created) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (image_id, sha256, source, style, json.dumps(caps), width, height, created))
                conn.execute("INSERT INTO captions_fts (id, best, others) VALUES (?, ?, ?)",
                             (image_id, caps[0]["text"] if caps else "", "\n".join(c["text"] for c in caps[1:])))
        except BaseException:
            full.unlink(missing_ok=True)
            thumb.unlink(missing_ok=True)
            raise
        return self.get(image_id)

    # --- reading ---

    def image_path(self, image_id: str) -> Path:
        if not valid_id(image_id):
            raise ValueError("invalid image id")
        return self.image_dir / f"{image_id}.jpg"

    def thumbnail_path(self, image_id: str) -> Path:
        if not valid_id(image_id):
            raise ValueError("invalid image id")
        return self.image_dir / f"{image_id}.thumb.jpg"

    @staticmethod
    def _record(row: sqlite3.Row) -> dict:
        return {"id": row["id"], "captions": json.loads(row["captions"]), "style": row["style"],
                "source": row["source"], "width": row["width"], "height": row["height"],
                "created": row["created"], "image_url": f"/api/images/{row['id']}",
                "thumbnail_url": f"/api/images/{row['id']}/thumbnail"}

    def get(self, image_id: str) -> dict | None:
        if not valid_id(image_id):
            return None
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        return self._record(row) if row else None

    def has_sha256(self, sha256: str) -> bool:
        with self._connect() as conn:
            return conn.execute("SELECT 1 FROM images WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone() is not None

    def count(self) -> int:
        with self._connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def recent(self, limit: int = 24, offset: int = 0) -> list[dict]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM images ORDER BY created DESC, rowid DESC LIMIT ? OFFSET ?",
                                (limit, offset)).fetchall()
        return [self._record(r) for r in rows]

    def search(self, text: str, limit: int = 24, offset: int = 0) -> tuple[list[dict], str]:
        """Images whose captions contain all the words of `text` (stemmed), best bm25 first; when
        none has them all, those with any of them. Returns (records, "all" | "any" | "recent")."""
        query = fts_query(text)
        if query is None:
            return self.recent(limit, offset), "recent"
        sql = (f"SELECT images.*, {_BM25} AS rank FROM captions_fts JOIN images ON images.id = captions_fts.id "
               f"WHERE captions_fts MATCH ? ORDER BY rank LIMIT ? OFFSET ?")
        with self._connect() as conn:
            rows = conn.execute(sql, (query, limit, offset)).fetchall()
            mode = "all"
            if not rows and " " in query:
                rows = conn.execute(sql, (query.replace('" "', '" OR "'), limit, offset)).fetchall()
                mode = "any"
        return [self._record(r) for r in rows], mode
