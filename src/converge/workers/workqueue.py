"""A keyed work queue for the controller, shaped like client-go's rate-limited workqueue.

A key is queued at most once however often it is added; a key being processed is not handed
out again until `done`, and one added meanwhile is queued again at `done` (so two workers never
reconcile one deployment at once, and no change seen mid-pass is lost). `add_after` holds a key
back (a rollout to look at again in a second, an autoscaling timer); `retry` holds it back for
an exponentially growing delay per key (a failing reconcile backs off on its own, the others
keep their pace) until `forget` resets it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, *, base_delay_s: float = 0.05, max_delay_s: float = 60.0) -> None:
        self._base, self._max = base_delay_s, max_delay_s
        self._order: deque[K] = deque()  # ready keys, first in first out
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._again: set[K] = set()  # added while processing: queued at done()
        self._failures: dict[K, int] = {}
        self._delayed: list[tuple[float, int, K]] = []  # (due, tiebreak, key), a heap
        self._due: dict[K, float] = {}  # each key's earliest pending delay
        self._seq = itertools.count()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def delayed(self) -> int:
        return len(self._due)

    def pending(self, key: K) -> bool:
        """Whether `key` will be handed out again without being added: queued, being processed
        (and added meanwhile), or held back by a delay."""
        return key in self._queued or key in self._again or key in self._processing or key in self._due

    def add(self, key: K) -> None:
        """Queue `key` now (a no-op if it is already queued)."""
        if key in self._processing:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._order.append(key)
            self._ready.set()

    def add_after(self, key: K, delay_s: float) -> None:
        """Queue `key` once `delay_s` has passed (an earlier pending delay for it wins)."""
        if delay_s <= 0:
            self.add(key)
            return
        due = asyncio.get_running_loop().time() + delay_s
        if self._due.get(key, float("inf")) <= due:
            return
        self._due[key] = due
        heapq.heappush(self._delayed, (due, next(self._seq), key))
        self._ready.set()  # a waiting get() recomputes how long to sleep

    def retry(self, key: K) -> float:
        """Queue `key` again after its next backoff delay (doubling per failure); the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = min(self._max, self._base * 2**failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """The key succeeded: its next failure starts from the base delay again."""
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    async def get(self) -> K:
        """The next ready key, marked as processing until `done(key)`."""
        loop = asyncio.get_running_loop()
        while True:
            self._promote(loop.time())
            if self._order:
                key = self._order.popleft()
                self._queued.discard(key)
                self._processing.add(key)
                return key
            self._ready.clear()
            timeout = self._delayed[0][0] - loop.time() if self._delayed else None
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                pass

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.add(key)

    def _promote(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            due, _, key = heapq.heappop(self._delayed)
            if self._due.get(key) == due:  # else superseded by an earlier delay, already handled
                del self._due[key]
                self.add(key)
