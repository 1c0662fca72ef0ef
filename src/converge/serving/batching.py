"""Dynamic batching: the texts of concurrent requests share forward passes.

Requests queue their texts. Each of `workers` workers takes up to `max_batch` texts from the
head of the queue (the rest of a large request stays queued for the next free worker, so one
request of 64 texts keeps two workers busy), waits up to `max_wait_s` for more when the batch is
not full, encodes them in a thread, and hands every request its own rows back once all of its
texts are done. While a batch is encoding the next one gathers, so under load batches fill
without any waiting; alone, a request only waits `max_wait_s` (0 by default: at once). A
worker's thread that finishes a pass takes the next queued batch itself: with many small
requests the event loop is busy with their HTTP, and a pass must not wait for it to start.

Several workers suit an engine whose passes are thread-safe and run on one thread each (ONNX
Runtime): one pass per granted core keeps every core busy, including while another pass is
tokenising or pooling, and a single-threaded GEMM wastes no time synchronising. One worker with
every thread suits the rest (torch).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from converge.serving.encoders import Encoded


@dataclass(slots=True)
class _Waiting:
    texts: list[str]
    future: asyncio.Future[Encoded]
    taken: int = 0  # texts handed to a worker so far
    done: int = 0  # texts encoded so far
    rows: list[np.ndarray] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rows = [np.empty(0, dtype=np.float32)] * len(self.texts)
        self.tokens = [0] * len(self.texts)


@dataclass(slots=True)
class _Slice:
    waiting: _Waiting
    start: int
    end: int


@dataclass
class BatchStats:
    batches: int = 0
    texts: int = 0
    running: int = 0  # requests with texts in the batches being encoded now
    largest: int = 0  # most texts in one batch so far
    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=64))  # texts per recent batch


class Batcher:
    def __init__(
        self,
        encode: Callable[[list[str]], Encoded],
        *,
        max_batch: int,
        max_wait_s: float,
        workers: int = 1,
    ) -> None:
        self._encode = encode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.workers = workers
        self.stats = BatchStats()
        self._queue: deque[_Waiting] = deque()
        self._queued_texts = 0  # texts not yet handed to a worker
        self._arrived: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # The queue is taken from by the workers' threads too (a pass that ends takes the next).
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Requests with texts queued behind the batches being encoded."""
        return len(self._queue)

    async def encode(self, texts: list[str]) -> Encoded:
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if not self._tasks or any(t.done() for t in self._tasks):
            self._tasks = [t for t in self._tasks if not t.done()]
            self._tasks += [
                loop.create_task(self._run(), name=f"embedding-batches-{i}")
                for i in range(self.workers - len(self._tasks))
            ]
        waiting = _Waiting(texts, loop.create_future())
        with self._lock:
            self._queue.append(waiting)
            self._queued_texts += len(texts)
        self._arrived.set()
        return await waiting.future

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for waiting in self._queue:
            waiting.future.cancel()

    async def _run(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._gather()
            with self._lock:
                batch = self._take()
            if not batch:  # every request gathered so far was abandoned by its client
                continue
            self._started(len({id(s.waiting) for s in batch}))
            await asyncio.to_thread(self._encode_while_queued, batch, loop)

    def _encode_while_queued(self, batch: list[_Slice], loop: asyncio.AbstractEventLoop) -> None:
        """Encode `batch`, then, while texts are queued, the next one, in this same thread: a
        finished pass hands its rows back to the event loop and the next pass starts at once,
        rather than waiting for a busy event loop to hand this worker its next batch."""
        first = True
        while batch:
            owners = {id(s.waiting): s.waiting for s in batch}
            if not first:  # the first was counted by the loop as it handed it over
                loop.call_soon_threadsafe(self._started, len(owners))
            first = False
            texts = [t for s in batch for t in s.waiting.texts[s.start : s.end]]
            outcome: Encoded | Exception
            try:
                outcome = self._encode(texts)
            except Exception as exc:
                outcome = exc
            with self._lock:
                after = self._take()
            try:
                done = functools.partial(
                    self._finished, batch, requests=len(owners), texts=len(texts), outcome=outcome
                )
                loop.call_soon_threadsafe(done)
            except RuntimeError:  # the loop closed meanwhile: nobody waits for these any more
                return
            batch = after

    def _started(self, requests: int) -> None:
        self.stats.running += requests

    def _finished(
        self, batch: list[_Slice], *, requests: int, texts: int, outcome: Encoded | Exception
    ) -> None:
        self.stats.running -= requests
        if isinstance(outcome, Exception):
            for waiting in {id(s.waiting): s.waiting for s in batch}.values():
                if not waiting.future.done():
                    waiting.future.set_exception(outcome)
            return
        self._record(texts)
        self._hand_back(batch, outcome)

    async def _gather(self) -> None:
        """Wait up to max_wait_s for the batch to fill (not at all when it is full already)."""
        if self.max_wait_s <= 0 or self._queued_texts >= self.max_batch:
            return
        assert self._arrived is not None
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while self._queued_texts < self.max_batch:
            self._arrived.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):  # wait_for can swallow a cancel on 3.11
                    await self._arrived.wait()

    def _take(self) -> list[_Slice]:
        """Up to max_batch texts from the head of the queue; a request is split only when it
        alone is larger than what is left of the batch. Under `_lock`."""
        batch: list[_Slice] = []
        room = self.max_batch
        while self._queue and room > 0:
            head = self._queue[0]
            left = len(head.texts) - head.taken
            if head.future.done():  # cancelled, or failed in another worker's batch
                self._queue.popleft()
                self._queued_texts -= left
                continue
            if batch and left > room and left <= self.max_batch:
                break  # it fits whole in the next batch: do not split it
            count = min(left, room)
            batch.append(_Slice(head, head.taken, head.taken + count))
            head.taken += count
            self._queued_texts -= count
            room -= count
            if head.taken == len(head.texts):
                self._queue.popleft()
        return batch

    def _hand_back(self, batch: list[_Slice], encoded: Encoded) -> None:
        row = 0
        for s in batch:
            waiting, count = s.waiting, s.end - s.start
            waiting.rows[s.start : s.end] = list(encoded.vectors[row : row + count])
            waiting.tokens[s.start : s.end] = encoded.tokens[row : row + count]
            waiting.done += count
            row += count
            if waiting.done == len(waiting.texts) and not waiting.future.done():
                waiting.future.set_result(Encoded(np.asarray(waiting.rows, dtype=np.float32), waiting.tokens))

    def _record(self, texts: int) -> None:
        self.stats.batches += 1
        self.stats.texts += texts
        self.stats.largest = max(self.stats.largest, texts)
        self.stats.sizes.append(texts)
