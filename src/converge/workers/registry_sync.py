"""Background services for the Model Library: registry sync and the first-start catalogue."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.config import Settings
from converge.control.library import catalogue
from converge.control.sources import repository as sources_repo
from converge.control.sources import service as sources
from converge.storage.artifacts import ArtifactStore

log = structlog.get_logger(__name__)


class RegistrySync:
    """Polls due sources; each pass is idempotent, so a crash or a second instance loses nothing."""

    name = "registry-sync"

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        store: ArtifactStore,
        poll_s: float = 1.0,
    ) -> None:
        self._sessions, self._settings, self._store, self._poll_s = sessions, settings, store, poll_s
        self._task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with self._sessions() as session:
                    due = await sources_repo.due(session, datetime.now(UTC))
                for source_id in due:
                    await sources.sync(
                        self._sessions, source_id=source_id, settings=self._settings, store=self._store
                    )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("registry_sync_pass_failed")
            await asyncio.sleep(self._poll_s)


class CatalogueSeeder:
    """One-shot: registers the built-in models after start-up, without delaying readiness."""

    name = "catalogue"

    def __init__(
        self, *, sessions: async_sessionmaker[AsyncSession], settings: Settings, store: ArtifactStore
    ) -> None:
        self._sessions, self._settings, self._store = sessions, settings, store
        self._task: asyncio.Task[list[str]] | None = None

    @property
    def healthy(self) -> bool:
        return self._task is None or not self._task.done() or self._task.exception() is None

    async def start(self) -> None:
        self._task = asyncio.create_task(catalogue.seed(self._sessions, self._settings, self._store))

    @property
    def task(self) -> asyncio.Task[list[str]] | None:
        return self._task

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
