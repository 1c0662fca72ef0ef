"""Which replica gets a request: ready ones only, least outstanding first, behind breakers.

Every replica endpoint has a circuit breaker: `breaker_failures` consecutive failures (connect
errors, 5xx, timeouts) open it; after `breaker_open_s` one probe request is let through
(half-open); a success closes it, a failure opens it again. A replica that is open is skipped.

Each deployment has a bounded queue: when every usable replica already holds
`max_in_flight_per_replica` requests, a request waits (FIFO) for a slot, up to `queue_size`
waiters and `queue_timeout_s`; beyond that the gateway answers 503.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from enum import IntEnum


class Breaker(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Replica:
    __slots__ = ("endpoint", "outstanding", "failures", "state", "opened_at", "probing")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.outstanding = 0
        self.failures = 0
        self.state = Breaker.CLOSED
        self.opened_at = 0.0
        self.probing = False

    def usable(self, now: float, open_s: float) -> bool:
        if self.state is Breaker.CLOSED:
            return True
        if self.state is Breaker.OPEN and now - self.opened_at >= open_s:
            self.state = Breaker.HALF_OPEN
        return self.state is Breaker.HALF_OPEN and not self.probing


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


class Pool:
    """The replicas of one deployment and the requests waiting for them."""

    def __init__(
        self,
        *,
        name: str,
        max_per_replica: int,
        queue_size: int,
        breaker_failures: int,
        breaker_open_s: float,
        on_breaker: collections.abc.Callable[[Replica], None] | None = None,
    ) -> None:
        self.name = name
        self.replicas: dict[str, Replica] = {}
        self.endpoints: tuple[str, ...] = ()
        self.max_per_replica, self.queue_size = max_per_replica, queue_size
        self.breaker_failures, self.breaker_open_s = breaker_failures, breaker_open_s
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.in_flight = 0
        self.waking = 0  # requests waiting for a deployment scaled to zero to start
        self._on_breaker = on_breaker

    def update(self, endpoints: tuple[str, ...]) -> None:
        """The ready endpoints changed (a new snapshot): keep the breakers of those that stay."""
        if endpoints == self.endpoints:
            return
        self.endpoints = endpoints
        self.replicas = {e: self.replicas.get(e) or Replica(e) for e in endpoints}
        self._wake_waiters()

    def pick(self, exclude: tuple[Replica, ...] = ()) -> Replica | None:
        best: Replica | None = None
        now = time.monotonic()
        for replica in self.replicas.values():
            if replica in exclude or replica.outstanding >= self.max_per_replica:
                continue
            if replica.state is not Breaker.CLOSED and not replica.usable(now, self.breaker_open_s):
                continue
            if best is None or replica.outstanding < best.outstanding:
                best = replica
        if best is not None:
            best.outstanding += 1
            self.in_flight += 1
            if best.state is Breaker.HALF_OPEN:
                best.probing = True
        return best

    async def acquire(self, exclude: tuple[Replica, ...], wait_s: float) -> Replica | None:
        """A replica with a free slot, waiting in the queue if all are busy.

        None means no replica is usable at all (none ready, or all excluded or open)."""
        replica = self.pick(exclude)
        if replica is not None:
            return replica
        if not self._any_could_serve(exclude):
            return None
        if len(self.waiters) >= self.queue_size:
            raise QueueFull
        deadline = time.monotonic() + wait_s
        while True:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.append(future)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await future
            except (TimeoutError, asyncio.CancelledError) as exc:
                if future.done() and not future.cancelled():
                    self._wake_waiters(1)  # woken as we gave up: pass the slot on
                else:
                    future.cancel()
                    _remove(self.waiters, future)
                if isinstance(exc, TimeoutError):
                    raise QueueTimeout from None
                raise
            replica = self.pick(exclude)
            if replica is not None:
                return replica
            if not self._any_could_serve(exclude):
                return None

    def release(self, replica: Replica, *, ok: bool | None) -> None:
        """Give the slot back; ok=True/False feeds the breaker, None (client went away) does not."""
        replica.outstanding -= 1
        self.in_flight -= 1
        if ok is not None:
            self.feed(replica, ok=ok)
        elif replica.state is Breaker.HALF_OPEN:
            replica.probing = False
        self._wake_waiters(1)

    def feed(self, replica: Replica, *, ok: bool) -> None:
        before = replica.state
        if ok:
            replica.failures = 0
            replica.state = Breaker.CLOSED
        else:
            replica.failures += 1
            if replica.state is Breaker.HALF_OPEN or replica.failures >= self.breaker_failures:
                replica.state = Breaker.OPEN
                replica.opened_at = time.monotonic()
        replica.probing = False
        if replica.state is not before and self._on_breaker is not None:
            self._on_breaker(replica)

    def _any_could_serve(self, exclude: tuple[Replica, ...]) -> bool:
        now = time.monotonic()
        return any(
            r not in exclude
            and (r.state is Breaker.CLOSED or r.usable(now, self.breaker_open_s) or r.probing)
            for r in self.replicas.values()
        )

    def _wake_waiters(self, count: int | None = None) -> None:
        woken = 0
        while self.waiters and (count is None or woken < count):
            future = self.waiters.popleft()
            if not future.done():
                future.set_result(None)
                woken += 1


def _remove(queue: collections.deque[asyncio.Future[None]], item: asyncio.Future[None]) -> None:
    with contextlib.suppress(ValueError):
        queue.remove(item)
