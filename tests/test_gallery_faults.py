"""The gallery when writers die or the disk fills: leftovers are swept, errors are clear, nothing is lost."""
from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from PIL import Image

from aicrl.serving import gallery as gallery_module
from aicrl.serving.commands import index_folder
from aicrl.serving.gallery import Gallery

ROOT = Path(__file__).resolve().parents[1]

# Stores one photo, but dies (SIGKILL, as `kill -9`) the moment its temp file is complete.
_KILLED_WRITER = """
import os, signal, sys
from PIL import Image
from aicrl.serving.gallery import Gallery
gallery = Gallery(sys.argv[1])
os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
gallery.add(Image.new("RGB", (8, 8), "red"), [{"text": "a red square", "score": 0}], "factual", "sha")
"""


def _caption(text: str = "a red square") -> list[dict]:
    return [{"text": text, "score": 0}]


def _names(gallery: Gallery) -> set[str]:
    return {p.name for p in gallery.image_dir.iterdir()}


def test_a_killed_writer_s_temp_file_is_removed_once_it_is_stale(tmp_path, monkeypatch):
    db = tmp_path / "gallery.db"
    run = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(db)], cwd=ROOT, capture_output=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    leftovers = list((tmp_path / "images").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-") and leftovers[0].suffix == ".jpg"

    Gallery(db)  # fresh: it could be a live writer's (the server's), so it stays
    assert leftovers[0].exists()
    monkeypatch.setattr(gallery_module, "STALE_SECONDS", 0)
    gallery = Gallery(db)
    assert _names(gallery) == set() and gallery.count() == 0


def test_opening_finishes_what_killed_adds_and_deletes_left(tmp_path, monkeypatch):
    gallery = Gallery(tmp_path / "gallery.db")
    kept = gallery.add(Image.new("RGB", (8, 8), "red"), _caption(), "factual", "a")["id"]
    undeleted = gallery.add(Image.new("RGB", (8, 8), "blue"), _caption("a blue square"), "factual", "b")["id"]
    deleted = gallery.add(Image.new("RGB", (8, 8), "green"), _caption("a green square"), "factual", "c")["id"]
    images = gallery.image_dir
    # killed inside delete(): after moving the files aside, before (undeleted) or after (deleted) the commit
    os.replace(images / f"{undeleted}.jpg", images / f".deleting-{undeleted}.jpg")
    for name in (f"{deleted}.jpg", f"{deleted}.thumb.jpg"):
        os.replace(images / name, images / f".deleting-{name}")
    with sqlite3.connect(gallery.db_path) as conn:
        conn.execute("DELETE FROM images WHERE id = ?", (deleted,))
    orphan = "0" * 32
    (images / f"{orphan}.jpg").write_bytes((images / f"{kept}.jpg").read_bytes())  # killed before its row
    (images / "notes.txt").write_text("not the gallery's")

    monkeypatch.setattr(gallery_module, "STALE_SECONDS", 0)
    gallery = Gallery(gallery.db_path)
    assert _names(gallery) == {f"{kept}.jpg", f"{kept}.thumb.jpg", f"{undeleted}.jpg", f"{undeleted}.thumb.jpg",
                               "notes.txt"}
    assert gallery.count() == 2 and gallery.search("blue")[0][0]["id"] == undeleted


def _tiny_photos(folder: Path, colours: list[str]) -> Path:
    folder.mkdir()
    for colour in colours:
        Image.new("RGB", (16, 16), colour).save(folder / f"{colour}.png")
    return folder


def _fill_the_disk(limit: int):
    """preexec_fn: files may not grow past `limit` bytes (`ulimit -f`); writes fail with EFBIG.
    Python ignores SIGXFSZ, so the process sees the error rather than being killed."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_stops_index_clearly_and_keeps_what_was_indexed(web_model_dir, web_captioner, tmp_path):
    db = tmp_path / "data" / "gallery.db"
    first = index_folder(_tiny_photos(tmp_path / "first", ["red"]), db, captioner=web_captioner, progress=False)
    assert first["indexed"] == 1
    assert db.stat().st_size > 20_000  # the limit below: the small photos fit, the database cannot grow

    more = _tiny_photos(tmp_path / "more", ["blue", "green"])
    command = [sys.executable, "-m", "aicrl.cli", "index", str(more), "--db", str(db), "--model", str(web_model_dir)]
    run = subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                         text=True, timeout=240, preexec_fn=_fill_the_disk(20_000))
    message = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and run.stdout == "", run.stderr[-3000:]
    assert "Traceback" not in run.stderr and message.startswith("aicrl index: cannot write the gallery")
    assert "disk I/O error" in message

    gallery = Gallery(db)  # whole: the first item, its files, no half item
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert gallery.count() == 1 and len(_names(gallery)) == 2
    again = index_folder(more, db, captioner=web_captioner, progress=False)  # with room again, it goes on
    assert again["indexed"] == 2 and again["gallery_images"] == 3 and len(_names(gallery)) == 6


def test_a_rerun_counts_photos_indexed_before_apart_from_duplicates(web_captioner, tmp_path):
    db = tmp_path / "gallery.db"
    folder = _tiny_photos(tmp_path / "photos", ["red", "blue"])
    first = index_folder(folder, db, captioner=web_captioner, progress=False)
    assert (first["indexed"], first["already_indexed"], first["skipped_duplicates"]) == (2, 0, 0)
    Image.new("RGB", (16, 16), "green").save(folder / "green.png")
    (folder / "red-again.png").write_bytes((folder / "red.png").read_bytes())
    (folder / "yellow.png").write_bytes((folder / "green.png").read_bytes())
    again = index_folder(folder, db, captioner=web_captioner, progress=False)
    # blue, red-again (sorted before red): indexed before; red repeats red-again, yellow repeats green
    assert (again["indexed"], again["already_indexed"], again["skipped_duplicates"]) == (1, 2, 2)
    assert again["gallery_images"] == 3
