"""Micro-batching: concurrent requests share one model call.

A worker thread takes the first waiting request, waits at most `max_wait_ms` for companions (up to
`max_batch`), and hands the whole group to `process(items) -> results` at once: a batch of 16 costs
little more than one image, so throughput under load is the batched rate. Requests that arrive
while a batch runs wait for the next one; at most `max_waiting` of them, beyond that `submit` raises
ServerBusy at once (the server answers 503) instead of queueing without bound.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence


class ServerBusy(Exception):
    """More requests than the inference queue holds."""


class MicroBatcher:
    """`process(items)` returns one result per item, in order; a result that is an exception is
    raised to that item's caller only."""

    def __init__(self, process: Callable[[list[Any]], Sequence[Any]], max_batch: int = 16,
                 max_wait_ms: float = 5.0, max_waiting: int = 16):
        if max_batch < 1 or max_waiting < 0:
            raise ValueError("max_batch must be >= 1 and max_waiting >= 0")
        self.process, self.max_batch, self.max_wait = process, max_batch, max_wait_ms / 1000
        self.max_waiting = max_waiting
        self._queue: deque[tuple[Any, asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._cond = threading.Condition()
        self._running = 0  # items in the batch being processed
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # counters for the model card and the tests
        self.largest_batch = 0

    @property
    def in_flight(self) -> int:
        return len(self._queue) + self._running

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            # An idle worker takes a whole batch at once; a busy one leaves max_waiting places.
            room = self.max_waiting + (0 if self._running else self.max_batch)
            if self._closed or len(self._queue) >= room:
                raise ServerBusy()
            self._queue.append((item, loop, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="aicrl-inference", daemon=True)
                self._thread.start()
            self._cond.notify()
        return await future

    def _next_batch(self) -> list[tuple[Any, asyncio.AbstractEventLoop, asyncio.Future]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.max_wait
            while len(self._queue) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)  # companions for the first request
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            self._running = len(batch)
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                results = list(self.process([item for item, _, _ in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"process returned {len(results)} results for {len(batch)} items")
            except BaseException as e:  # noqa: BLE001  (every caller gets the error, the worker lives on)
                results = [e] * len(batch)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            with self._cond:
                self._running = 0
            for (_, loop, future), result in zip(batch, results):
                _call_soon(loop, future, result)

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for _, loop, future in pending:
            _call_soon(loop, future, ServerBusy())


def _call_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any) -> None:
    try:
        loop.call_soon_threadsafe(_resolve, future, result)
    except RuntimeError:  # that request's event loop is closed: nobody is waiting any more
        pass


def _resolve(future: asyncio.Future, result: Any) -> None:
    if future.cancelled():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
