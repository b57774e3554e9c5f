"""Micro-batching: concurrent requests share one model call and get the captions they would alone."""
from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from aicrl.serving.app import create_app
from aicrl.serving.batching import MicroBatcher, ServerBusy

from .conftest import SAMPLES


def test_concurrent_uploads_are_captioned_in_one_batch_with_the_same_captions(web_model_dir, web_captioner, tmp_path):
    app = create_app(model_dir=web_model_dir, db_path=tmp_path / "g.db", captioner=web_captioner,
                     max_batch=8, batch_wait_ms=300)
    photos = [SAMPLES / n for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg")] * 2

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as ac:
            posts = [ac.post("/api/captions", files={"image": (p.name, p.read_bytes(), "image/jpeg")},
                             data={"n_best": "2"}) for p in photos]
            posts.append(ac.post("/api/captions", files={"image": ("bad.jpg", b"not an image", "image/jpeg")}))
            posts.append(ac.post("/api/captions", files={"image": ("c.jpg", photos[0].read_bytes(), "image/jpeg")},
                                 data={"style": "humorous", "beam_size": "1"}))
            return await asyncio.gather(*posts)

    responses = asyncio.run(scenario())
    *good, bad, funny = responses
    assert [r.status_code for r in good] == [200] * len(photos) and bad.status_code == 400 and funny.status_code == 200
    assert app.state.runner.largest_batch > 1  # companions were captioned together
    for photo, r in zip(photos, good):
        alone = web_captioner.caption([photo], n_best=2)[0].captions
        assert [(c["text"], c["score"]) for c in r.json()["captions"]] == [(c.text, round(c.score, 4)) for c in alone]
    alone = web_captioner.caption([photos[0]], beam_size=1, style="humorous")[0].captions[0].text
    assert funny.json()["captions"][0]["text"] == alone and funny.json()["style"] == "humorous"
    app.state.runner.shutdown()


def test_batcher_bounds_its_queue_and_isolates_errors():
    release, started = threading.Event(), threading.Event()
    seen: list[list[int]] = []

    def process(items):
        started.set()
        release.wait(10)
        seen.append(items)
        return [ValueError("odd") if i % 2 else i * 10 for i in items]

    batcher = MicroBatcher(process, max_batch=4, max_wait_ms=1, max_waiting=2)

    async def scenario():
        first = asyncio.create_task(batcher.submit(0))
        while not started.is_set():
            await asyncio.sleep(0.005)
        queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(ServerBusy):  # one batch running, max_waiting=2 queued: full
            await batcher.submit(3)
        release.set()
        return await first, await asyncio.gather(*queued, return_exceptions=True)

    first, rest = asyncio.run(scenario())
    assert first == 0 and isinstance(rest[0], ValueError) and rest[1] == 20
    assert seen == [[0], [1, 2]]
    batcher.shutdown()
