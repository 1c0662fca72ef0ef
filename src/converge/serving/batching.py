"""Dynamic batching: concurrent requests share one forward pass.

Requests queue; one worker takes as many as fit in `max_batch` texts (at least one request,
however large), waits up to `max_wait_s` for more when the batch is not full, encodes them in a
worker thread, and hands each request its own rows back. While a batch is encoding the next one
gathers, so under load batches fill without any waiting; alone, a request only waits
`max_wait_s` (0 by default: it is encoded at once).

Encoding stays one batch at a time: ONNX Runtime or torch already spread one batch over the
threads the replica was granted, so two batches at once would only contend.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from converge.serving.encoders import Encoded


@dataclass(slots=True)
class _Waiting:
    texts: list[str]
    future: asyncio.Future[Encoded]


@dataclass
class BatchStats:
    batches: int = 0
    texts: int = 0
    running: int = 0  # requests in the batch being encoded now
    largest: int = 0  # most texts in one batch so far
    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=64))  # texts per recent batch


class Batcher:
    def __init__(self, encode: Callable[[list[str]], Encoded], *, max_batch: int, max_wait_s: float) -> None:
        self._encode = encode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._queue: deque[_Waiting] = deque()
        self._queued_texts = 0
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Requests queued behind the batch being encoded."""
        return len(self._queue)

    async def encode(self, texts: list[str]) -> Encoded:
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run(), name="embedding-batches")
        waiting = _Waiting(texts, loop.create_future())
        self._queue.append(waiting)
        self._queued_texts += len(texts)
        self._arrived.set()
        return await waiting.future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for waiting in self._queue:
            waiting.future.cancel()

    async def _run(self) -> None:
        assert self._arrived is not None
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._gather()
            batch = self._take()
            if not batch:  # every request gathered so far was abandoned by its client
                continue
            texts = [text for waiting in batch for text in waiting.texts]
            self.stats.running = len(batch)
            try:
                encoded = await asyncio.to_thread(self._encode, texts)
            except Exception as exc:
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(exc)
                continue
            finally:
                self.stats.running = 0
            self._record(len(texts))
            start = 0
            for waiting in batch:
                end = start + len(waiting.texts)
                if not waiting.future.done():
                    waiting.future.set_result(Encoded(encoded.vectors[start:end], encoded.tokens[start:end]))
                start = end

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
                await asyncio.wait_for(self._arrived.wait(), left)

    def _take(self) -> list[_Waiting]:
        batch: list[_Waiting] = []
        size = 0
        while self._queue:
            head = self._queue[0]
            if batch and size + len(head.texts) > self.max_batch:
                break
            self._queue.popleft()
            self._queued_texts -= len(head.texts)
            if head.future.done():  # cancelled: the client went away while it waited
                continue
            batch.append(head)
            size += len(head.texts)
        return batch

    def _record(self, texts: int) -> None:
        self.stats.batches += 1
        self.stats.texts += texts
        self.stats.largest = max(self.stats.largest, texts)
        self.stats.sizes.append(texts)
