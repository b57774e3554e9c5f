"""The gallery: every captioned photo, its captions per style and its tags, in SQLite with FTS5 search.

Layout (a data folder):
    gallery.db          SQLite database (WAL mode): table `images` and the FTS5 table `gallery_fts`
    images/<id>.jpg     the stored image (EXIF orientation applied, re-encoded from its pixels so no
                        metadata survives, longest side at most `MAX_SIDE` px, JPEG)
    images/<id>.thumb.jpg   a thumbnail (longest side `THUMB_SIDE` px)

One item per photo, found by the SHA-256 of its bytes: captioning it again (another style, another
beam width) updates the item, which keeps the newest captions of each style. The search index holds
the best caption of each style, the other beam candidates and the tags.

Images are addressed only by their generated id (32 hex digits, `ID_PATTERN`), never by a client path.
Files are written atomically (a temp file in the same folder, then `os.replace`) before the rows are
inserted in one transaction, so a row never points at a missing or half-written file; a delete moves
the files aside, removes the rows in one transaction, then the files (or moves them back on failure).
Every SQL statement is parameterised; search terms are quoted before they reach FTS5's query syntax.

A process killed mid-write (kill -9, power cut) can leave files no row names: a hidden `.tmp-*`
file, an item's files written before its row, or a delete's `.deleting-*` files. Opening the gallery
sweeps them, but only those older than `STALE_SECONDS`: a live writer (the server, a concurrent
`aicrl index`) holds such a file for milliseconds, so an old one is a dead writer's, and no lock
between processes is needed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import tempfile
import time
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
STALE_SECONDS = 60  # leftovers older than this are a killed writer's (a live write takes milliseconds)
_TEMP, _DELETING = ".tmp-", ".deleting-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id       TEXT PRIMARY KEY,
    sha256   TEXT NOT NULL,          -- of the original bytes: one gallery item per photo
    source   TEXT,                   -- file name for `aicrl index`, NULL for uploads
    style    TEXT NOT NULL,          -- the style captioned last
    captions TEXT NOT NULL,          -- JSON list of {"text", "score"}, best first, of that style
    width    INTEGER NOT NULL,
    height   INTEGER NOT NULL,
    created  TEXT NOT NULL           -- ISO 8601, UTC
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
CREATE INDEX IF NOT EXISTS images_created ON images (created);
CREATE VIRTUAL TABLE IF NOT EXISTS gallery_fts USING fts5 (
    id UNINDEXED, best, others, tags, tokenize = 'porter unicode61'
);
"""
# Columns added after the first release: (name, SQL type and default); old databases get them on open.
_NEW_COLUMNS = [
    ("styles", "TEXT NOT NULL DEFAULT '{}'"),  # JSON {style: {"captions", "created"}}, the newest per style
    ("tags", "TEXT NOT NULL DEFAULT '[]'"),    # JSON list of {"label", "probability"} (ImageNet)
    ("updated", "TEXT"),                       # last captioned, ISO 8601 UTC
]
# bm25 column weights (id, best captions, other beam candidates, tags): best captions count most.
_BM25 = "bm25(gallery_fts, 0.0, 2.0, 1.0, 1.5)"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def valid_id(image_id: str) -> bool:
    return bool(_ID_RE.fullmatch(image_id or ""))


def open_image(data: bytes) -> Image.Image:
    """Decode uploaded bytes for storage: RGB, upright, at most about MAX_SIDE px (fast for big JPEGs)."""
    return decode_image(data, max_side=MAX_SIDE)


def _jpeg(image: Image.Image, side: int, quality: int) -> bytes:
    """Pixels only: a new image, so no metadata of the upload (EXIF, GPS, XMP, ICC, JPEG comments)
    can reach the stored file, whatever PIL carries over in `info`."""
    image = image.copy()
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    clean = Image.frombytes("RGB", image.size, image.convert("RGB").tobytes())
    out = io.BytesIO()
    clean.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TEMP, suffix=path.suffix)
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _clean_captions(captions: list[dict]) -> list[dict]:
    return [{"text": str(c["text"]), "score": round(float(c["score"]), 4)} for c in captions]


class Gallery:
    """Captioned images in a SQLite database, with an images folder beside it. One item per photo
    (by the SHA-256 of its bytes), holding the newest captions of each style and its tags."""

    def __init__(self, db_path: str | os.PathLike):
        self.db_path = Path(db_path)
        self.image_dir = self.db_path.parent / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            self._migrate(conn)
        self._sweep_leftovers()

    def _sweep_leftovers(self) -> None:
        """Finish what killed writers left (see the module notes): temp files and files of items
        without a row are removed; a delete that never committed gets its files back."""
        cutoff = time.time() - STALE_SECONDS
        with self._connect() as conn:
            ids = {row["id"] for row in conn.execute("SELECT id FROM images")}
        for path in self.image_dir.iterdir():
            try:
                if path.stat().st_ctime > cutoff:  # ctime: a rename (a delete moving files aside) renews it
                    continue
                name = path.name.removeprefix(_DELETING)
                image_id = name.split(".")[0]
                if path.name.startswith(_DELETING) and image_id in ids:
                    os.replace(path, path.with_name(name))  # its row is still there: the delete failed
                elif path.name.startswith((_TEMP, _DELETING)) or (valid_id(image_id) and image_id not in ids):
                    path.unlink()
            except FileNotFoundError:  # another process swept it first
                continue

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe from any thread (the server's worker,
        # the event loop, a concurrent `aicrl index`).
        with closing(sqlite3.connect(self.db_path, timeout=30)) as conn:
            conn.row_factory = sqlite3.Row
            with conn:  # a transaction: commit on success, rollback on error
                yield conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring a database of an older version up to date (new columns, the tags search index)."""
        have = {row["name"] for row in conn.execute("PRAGMA table_info(images)")}
        for name, kind in _NEW_COLUMNS:
            if name not in have:
                conn.execute(f"ALTER TABLE images ADD COLUMN {name} {kind}")
        old_index = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'captions_fts'").fetchone()
        if old_index:  # the first release indexed captions only: rebuild with tags
            conn.execute("DROP TABLE captions_fts")
            for row in conn.execute("SELECT * FROM images").fetchall():
                self._index(conn, self._record(row))

    @staticmethod
    def _index(conn: sqlite3.Connection, record: dict) -> None:
        """(Re)write an item's search entry: the best caption of every style, the other candidates,
        the tags."""
        conn.execute("DELETE FROM gallery_fts WHERE id = ?", (record["id"],))
        per_style = [entry["captions"] for entry in record["styles"].values()]
        best = "\n".join(caps[0]["text"] for caps in per_style if caps)
        others = "\n".join(c["text"] for caps in per_style for c in caps[1:])
        tags = "\n".join(t["label"] for t in record["tags"])
        conn.execute("INSERT INTO gallery_fts (id, best, others, tags) VALUES (?, ?, ?, ?)",
                     (record["id"], best, others, tags))

    # --- writing ---

    def add(self, image: Image.Image, captions: list[dict], style: str, sha256: str,
            source: str | None = None, tags: list[dict] | None = None, attention: dict | None = None) -> dict:
        """Store a photo's captions in `style` (and its tags); returns its record. A photo already
        in the gallery (same `sha256`) keeps its item: these captions replace that style's, and
        nothing new is written to disk. A new photo is stored resized and re-encoded as JPEG.
        `attention` ({"words", "weights", "grid"} of the best caption) is kept for the detail view."""
        caps = _clean_captions(captions)
        entry = {"captions": caps, "created": _now()} | ({"attention": attention} if attention else {})
        existing = self.find_sha256(sha256)
        if existing is not None and self._update(existing, entry, style, source, tags):
            return self.get(existing)
        image_id = uuid.uuid4().hex
        full, thumb = self.image_path(image_id), self.thumbnail_path(image_id)
        stored = _jpeg(image, MAX_SIDE, 90)
        _write_atomic(full, stored)
        try:
            _write_atomic(thumb, _jpeg(image, THUMB_SIDE, 82))
            width, height = Image.open(io.BytesIO(stored)).size
            created = entry["created"]
            styles = {style: entry}
            with self._connect() as conn:
                conn.execute("INSERT INTO images (id, sha256, source, style, captions, width, height, created, "
                             "styles, tags, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (image_id, sha256, source, style, json.dumps(caps), width, height, created,
                              json.dumps(styles), json.dumps(tags or []), created))
                self._reindex(conn, image_id)
        except BaseException:
            full.unlink(missing_ok=True)
            thumb.unlink(missing_ok=True)
            raise
        return self.get(image_id)

    def _update(self, image_id: str, entry: dict, style: str, source: str | None,
                tags: list[dict] | None) -> bool:
        """Put `style`'s captions on an existing item; False when it has gone meanwhile (deleted)."""
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is None:
                return False
            record = self._record(row, attention=True)
            styles = record["styles"] | {style: entry}
            conn.execute("UPDATE images SET style = ?, captions = ?, styles = ?, tags = ?, updated = ?, "
                         "source = COALESCE(source, ?) WHERE id = ?",
                         (style, json.dumps(entry["captions"]), json.dumps(styles),
                          json.dumps(tags if tags is not None else record["tags"]), entry["created"], source,
                          image_id))
            self._reindex(conn, image_id)
        return True

    def _reindex(self, conn: sqlite3.Connection, image_id: str) -> None:
        self._index(conn, self._record(conn.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()))

    def delete(self, image_id: str) -> bool:
        """Remove an item: its row, its search entry and its two files, all or nothing. False when
        there is no such item."""
        if not valid_id(image_id):
            return False
        files = [self.image_path(image_id), self.thumbnail_path(image_id)]
        # Files are first moved aside, so a failed transaction can put them back, and a crash
        # leaves hidden leftovers, never a row without its image.
        moved = []
        try:
            for path in files:
                if path.exists():
                    aside = path.with_name(_DELETING + path.name)
                    os.replace(path, aside)
                    moved.append((path, aside))
            with self._connect() as conn:
                gone = conn.execute("DELETE FROM images WHERE id = ?", (image_id,)).rowcount
                conn.execute("DELETE FROM gallery_fts WHERE id = ?", (image_id,))
        except BaseException:
            for path, aside in moved:
                os.replace(aside, path)
            raise
        for _, aside in moved:
            aside.unlink(missing_ok=True)
        return bool(gone)

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
    def _record(row: sqlite3.Row, attention: bool = False) -> dict:
        """A row as the API gives it; the stored attention maps only with `attention` (they are big)."""
        captions = json.loads(row["captions"])
        # Items from before styles were kept per photo hold one style: the row's own.
        styles = json.loads(row["styles"] or "{}") or {row["style"]: {"captions": captions, "created": row["created"]}}
        if not attention:
            styles = {name: {k: v for k, v in entry.items() if k != "attention"} for name, entry in styles.items()}
        return {"id": row["id"], "captions": captions, "style": row["style"], "styles": styles,
                "tags": json.loads(row["tags"] or "[]"), "source": row["source"], "width": row["width"],
                "height": row["height"], "created": row["created"], "updated": row["updated"] or row["created"],
                "image_url": f"/api/images/{row['id']}", "thumbnail_url": f"/api/images/{row['id']}/thumbnail"}

    def get(self, image_id: str, attention: bool = False) -> dict | None:
        if not valid_id(image_id):
            return None
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        return self._record(row, attention) if row else None

    def find_sha256(self, sha256: str) -> str | None:
        """The id of the newest item of this photo, or None."""
        with self._connect() as conn:
            row = conn.execute("SELECT id FROM images WHERE sha256 = ? ORDER BY created DESC, rowid DESC LIMIT 1",
                               (sha256,)).fetchone()
        return row["id"] if row else None

    def has_caption(self, sha256: str, style: str) -> bool:
        """Whether this photo is in the gallery with captions in `style` (what `aicrl index` skips)."""
        image_id = self.find_sha256(sha256)
        record = self.get(image_id) if image_id else None
        return record is not None and style in record["styles"]

    def count(self) -> int:
        with self._connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def recent(self, limit: int = 24, offset: int = 0) -> list[dict]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM images ORDER BY COALESCE(updated, created) DESC, rowid DESC "
                                "LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [self._record(r) for r in rows]

    def search(self, text: str, limit: int = 24, offset: int = 0) -> tuple[list[dict], str]:
        """Images whose captions or tags contain all the words of `text` (stemmed), best bm25 first;
        when none has them all, those with any of them. Returns (records, "all" | "any" | "recent")."""
        query = fts_query(text)
        if query is None:
            return self.recent(limit, offset), "recent"
        sql = (f"SELECT images.*, {_BM25} AS rank FROM gallery_fts JOIN images ON images.id = gallery_fts.id "
               f"WHERE gallery_fts MATCH ? ORDER BY rank LIMIT ? OFFSET ?")
        with self._connect() as conn:
            rows = conn.execute(sql, (query, limit, offset)).fetchall()
            mode = "all"
            if not rows and " " in query:
                rows = conn.execute(sql, (query.replace('" "', '" OR "'), limit, offset)).fetchall()
                mode = "any"
        return [self._record(r) for r in rows], mode
