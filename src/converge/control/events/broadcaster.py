"""Fan-out of committed events to live subscribers (SSE), fed by PostgreSQL LISTEN/NOTIFY.

Each NOTIFY carries one event id. A dispatcher batches the ids that arrived together, reads
those events in one query and hands each to the subscribers whose filter matches. Every app
instance runs its own Broadcaster, so an event committed through any instance reaches the
SSE clients of all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import psycopg
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.control.events.repository import CHANNEL, list_events
from converge.kit.service import Service
from converge.models import Event

log = structlog.get_logger(__name__)
QUEUE_SIZE = 1000


@dataclass(frozen=True)
class Published:
    id: int
    kind: str
    project_id: uuid.UUID | None
    restricted: bool
    json: str

    @classmethod
    def of(cls, event: Event) -> Published:
        return cls(
            id=event.id,
            kind=event.kind,
            project_id=event.project_id,
            restricted=event.restricted,
            json=event_json(event),
        )


def event_json(event: Event) -> str:
    return json.dumps(
        {
            "id": event.id,
            "at": event.at.isoformat(),
            "kind": event.kind,
            "project_id": str(event.project_id) if event.project_id else None,
            "object_id": event.object_id,
            "data": event.data,
        },
        separators=(",", ":"),
        default=str,
    )


@dataclass(eq=False)  # identity semantics: each connection is its own subscription
class Subscription:
    visible: Collection[uuid.UUID] | None  # None = all projects
    project_id: uuid.UUID | None
    kinds: Sequence[str]
    queue: asyncio.Queue[Published | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    overflowed: bool = False

    def wants(self, ev: Published) -> bool:
        if ev.project_id is not None:
            if self.visible is not None and ev.project_id not in self.visible:
                return False
            if self.project_id is not None and ev.project_id != self.project_id:
                return False
        elif self.project_id is not None or (ev.restricted and self.visible is not None):
            return False
        if self.kinds:
            return any(ev.kind == k or ev.kind.startswith(k + ".") for k in self.kinds)
        return True


class Broadcaster(Service):
    name = "event-broadcaster"

    def __init__(self, *, conninfo: str, sessions: async_sessionmaker[AsyncSession]) -> None:
        super().__init__()
        self._conninfo = conninfo
        self._sessions = sessions
        self._subs: set[Subscription] = set()
        self._ids: asyncio.Queue[int] = asyncio.Queue()
        self._listening = asyncio.Event()

    @property
    def healthy(self) -> bool:
        return self._listening.is_set() and super().healthy

    async def start(self) -> None:
        self._spawn(self._listen())
        self._spawn(self._dispatch())
        await asyncio.wait_for(self._listening.wait(), timeout=10)

    async def stop(self) -> None:
        await super().stop()
        for sub in list(self._subs):
            sub.queue.put_nowait(None)

    def subscribe(
        self, *, visible: Collection[uuid.UUID] | None, project_id: uuid.UUID | None, kinds: Sequence[str]
    ) -> Subscription:
        sub = Subscription(visible=visible, project_id=project_id, kinds=kinds)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    backoff = 0.5
                    async for note in conn.notifies():
                        self._ids.put_nowait(int(note.payload))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnect: the database restarted or the network blinked
                self._listening.clear()
                log.warning("event_listener_reconnecting", error=str(exc), in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)

    async def _dispatch(self) -> None:
        while True:
            ids = [await self._ids.get()]
            while not self._ids.empty():
                ids.append(self._ids.get_nowait())
            try:
                async with self._sessions() as s:
                    events = await list_events(s, visible=None, ids=ids, limit=len(ids))
            except Exception as exc:
                log.warning("event_dispatch_failed", error=str(exc), count=len(ids))
                continue
            for event in events:
                self.publish(Published.of(event))

    def publish(self, ev: Published) -> None:
        for sub in list(self._subs):
            if sub.overflowed or not sub.wants(ev):
                continue
            try:
                sub.queue.put_nowait(ev)
            except asyncio.QueueFull:
                # A stalled client: end its stream; it resumes with Last-Event-ID and loses nothing.
                sub.overflowed = True
                self._subs.discard(sub)
                with contextlib.suppress(asyncio.QueueEmpty):
                    sub.queue.get_nowait()
                sub.queue.put_nowait(None)
