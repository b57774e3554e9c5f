"""Micro-batching: concurrent requests share one model call.

A worker thread takes the first waiting request, waits at most `max_wait_ms` for companions (up to
`max_batch`), and hands the whole group to `process(items) -> results` at once: a batch of 16 costs
little more than one image, so throughput under load is the batched rate. Requests that arrive
while a batch runs wait for the next ones. The queue is bounded by the work it holds: as many items
as the worker gets through in `max_queue_s` seconds (measured per item from the batches it ran), and
never fewer than `max_waiting`. Beyond that `submit` raises ServerBusy at once (the server answers
503 with Retry-After) instead of queueing without bound.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence


class ServerBusy(Exception):
    """More requests than the queue holds; `retry_after`: seconds until it has room again."""

    def __init__(self, retry_after: int = 5):
        super().__init__(f"busy; retry after {retry_after} s")
        self.retry_after = retry_after


class MicroBatcher:
    """`process(items)` returns one result per item, in order; a result that is an exception is
    raised to that item's caller only."""

    def __init__(self, process: Callable[[list[Any]], Sequence[Any]], max_batch: int = 16,
                 max_wait_ms: float = 5.0, max_waiting: int = 16, max_queue_s: float = 0.0):
        if max_batch < 1 or max_waiting < 0 or max_queue_s < 0:
            raise ValueError("max_batch must be >= 1, max_waiting and max_queue_s >= 0")
        self.process, self.max_batch, self.max_wait = process, max_batch, max_wait_ms / 1000
        self.max_waiting, self.max_queue_s = max_waiting, max_queue_s
        self.seconds_per_item: float | None = None  # measured: a moving average over the batches
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

    @property
    def capacity(self) -> int:
        """How many items may wait while a batch runs: `max_queue_s` of work, at least `max_waiting`."""
        per_item = self.seconds_per_item
        by_work = int(self.max_queue_s / per_item) if per_item else 0
        return max(self.max_waiting, by_work)

    def observe(self, seconds: float, items: int) -> None:
        """Count a batch of `items` that took `seconds` into the time per item."""
        if items < 1:
            return
        per_item = seconds / items
        old = self.seconds_per_item
        self.seconds_per_item = per_item if old is None else 0.7 * old + 0.3 * per_item

    def retry_after(self) -> int:
        """Seconds until the queue has room: the work ahead, rounded up (5 before anything is measured)."""
        if not self.seconds_per_item:
            return 5
        return max(1, min(60, math.ceil(self.in_flight * self.seconds_per_item)))

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            # An idle worker takes a whole batch at once; a busy one leaves `capacity` places.
            room = self.capacity + (0 if self._running else self.max_batch)
            if self._closed or len(self._queue) >= room:
                raise ServerBusy(self.retry_after())
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
            started = time.perf_counter()
            try:
                results = list(self.process([item for item, _, _ in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"process returned {len(results)} results for {len(batch)} items")
                self.observe(time.perf_counter() - started, len(batch))
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


class BoundedWorker:
    """One worker thread for other CPU work (BLEU), with at most `max_waiting` calls waiting for it.
    One thread, not a pool: Python threads busy with CPU work hold the GIL in turns, and the event
    loop would wait behind every one of them."""

    def __init__(self, max_waiting: int = 16, name: str = "aicrl-worker"):
        self.capacity = max_waiting + 1  # one running + max_waiting queued
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._in_flight = 0

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self._in_flight >= self.capacity:
                raise ServerBusy(2)
            self._in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            with self._lock:
                self._in_flight -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


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
