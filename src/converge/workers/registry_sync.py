"""Background services for the Model Library: registry sync and the first-start catalogue."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.config import Settings
from converge.control.library import catalogue
from converge.control.sources import repository as sources_repo
from converge.control.sources import service as sources
from converge.kit.service import Service
from converge.storage.artifacts import ArtifactStore

log = structlog.get_logger(__name__)


class RegistrySync(Service):
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
        super().__init__()
        self._sessions, self._settings, self._store, self._poll_s = sessions, settings, store, poll_s

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


class CatalogueSeeder(Service):
    """One-shot: registers the built-in models after start-up, without delaying readiness."""

    name = "catalogue"

    def __init__(
        self, *, sessions: async_sessionmaker[AsyncSession], settings: Settings, store: ArtifactStore
    ) -> None:
        super().__init__()
        self._sessions, self._settings, self._store = sessions, settings, store
        self.task: asyncio.Task[list[str]] | None = None  # what later one-shots wait for

    @property
    def healthy(self) -> bool:  # a one-shot: done is fine, failed is not
        return self.task is None or not self.task.done() or self.task.exception() is None

    async def start(self) -> None:
        self.task = self._spawn(catalogue.seed(self._sessions, self._settings, self._store))
