"""A leader-elected worker that brings the cluster in line with the database in full passes.

One process at a time leads (a PostgreSQL advisory lock per kind of worker, `storage/leader.py`).
The leader runs `sync()` every `interval_s`, after `retry_s` when a pass failed, and at once when
an event of `wake_kinds` commits or `wake()` is called (a watch saw a change). Passes are
level-triggered: each compares everything again, so one that failed part way loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, ClassVar

import psycopg
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.control.events import repository as events_repo
from converge.kit import channels
from converge.kit.service import Service
from converge.runtime.kubernetes.client import KubeError
from converge.storage.leader import leadership

log = structlog.get_logger(__name__)
WAKE_POLL_S = 0.5  # how often a wait looks whether `wake()` was called


class ClusterSync(Service):
    lock_key: ClassVar[int]
    wake_kinds: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        conninfo: str,
        interval_s: float,
        retry_s: float,
    ) -> None:
        super().__init__()
        self._sessions, self._conninfo = sessions, conninfo
        self._interval, self._retry = interval_s, retry_s
        self.is_leader = False
        self.passes = 0  # completed passes (`sync` counts them)
        self.last: Any = None  # what the last good pass returned
        self.error: str | None = None  # why the last pass failed (None after a good one)
        self._wake = asyncio.Event()

    async def sync(self) -> Any:
        """One full pass; raises `KubeError` when the API cannot be reached."""
        raise NotImplementedError

    async def after_pass(self, *, ok: bool) -> None:
        """Called by the leader after each pass (e.g. to start a watch once a kind is served)."""

    async def on_lost_leadership(self) -> None:
        """Called when the lead ends (stop what `after_pass` started)."""

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        label = self.name.replace("-", "_")
        while True:
            try:
                async with leadership(self._conninfo, key=self.lock_key) as conn:
                    self.is_leader = True
                    log.info(f"{label}_leading")
                    await conn.execute(f"LISTEN {channels.EVENTS}")
                    while True:  # the lock lives as long as this connection
                        await conn.execute("SELECT 1")
                        self._wake.clear()
                        ok = await self._pass()
                        await self.after_pass(ok=ok)
                        await self._wait(conn, self._interval if ok else min(self._retry, self._interval))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(f"{label}_leader_lost")
                await asyncio.sleep(self._retry)
            finally:
                self.is_leader = False
                await self.on_lost_leadership()

    async def _pass(self) -> bool:
        label = self.name.replace("-", "_")
        try:
            self.last = await self.sync()
        except KubeError as exc:  # an outage, throttling, RBAC: the next pass starts over
            self.error = exc.message
            log.warning(f"{label}_pass_failed", reason=exc.reason, error=exc.message)
            return False
        except Exception as exc:  # the database, or a bug: the next pass starts over too
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception(f"{label}_pass_crashed")
            return False
        self.error = None
        return True

    async def _wait(self, conn: psycopg.AsyncConnection[Any], seconds: float) -> None:
        """Until `seconds` have passed, `wake()` was called, or an event of `wake_kinds` committed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            if self._wake.is_set():
                return
            ids: list[int] = []
            async for note in conn.notifies(timeout=min(left, WAKE_POLL_S), stop_after=1):
                with contextlib.suppress(ValueError):
                    ids.append(int(note.payload))
            if not ids:
                continue
            async for note in conn.notifies(timeout=0.05):  # a transaction's events come together
                with contextlib.suppress(ValueError):
                    ids.append(int(note.payload))
            async with self._sessions() as session:
                relevant = await events_repo.list_events(
                    session, visible=None, kinds=self.wake_kinds, ids=ids, limit=1
                )
            if relevant:
                return
