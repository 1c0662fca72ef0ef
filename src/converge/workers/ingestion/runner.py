"""The claim loop: queued jobs, and running ones whose process died, each run to its end."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.config import Settings
from converge.control.rag import retrieval
from converge.control.rag.schemas import JobState
from converge.gateway.api import Gateway
from converge.kit.observability import Metrics
from converge.kit.service import Service, cancel
from converge.models import IngestionJob, KnowledgeBase
from converge.storage.artifacts import ArtifactStore
from converge.storage.db import transaction
from converge.workers.ingestion.pipeline import Cancelled, Deps, Job, Progress
from converge.workers.ingestion.repository import claim_next, heartbeat, job_event, upload_wanted
from converge.workers.ingestion.sources import Unusable

log = structlog.get_logger(__name__)


class IngestionRunner(Service):
    name = "ingestion-runner"

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        store: ArtifactStore,
        gateway: Gateway | None,
        concurrency: int = 1,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self._metrics = metrics or Metrics()
        self.deps = Deps(sessions=sessions, settings=settings, store=store, gateway=gateway)
        self._concurrency = concurrency
        self._active: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._spawn(self._claim())

    async def stop(self) -> None:
        await cancel(*self._tasks, *self._active)

    async def _claim(self) -> None:
        while True:
            try:
                while len(self._active) < self._concurrency:
                    async with transaction(self.deps.sessions) as session:
                        job = await claim_next(session, settings=self.deps.settings)
                    if job is None:
                        break
                    task = asyncio.create_task(self.run(job.id))
                    self._active.add(task)
                    task.add_done_callback(self._active.discard)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ingestion_claim_failed")
            await asyncio.sleep(self.deps.settings.rag.poll_interval_s)

    async def run(self, job_id: uuid.UUID) -> None:
        """Run a job this process has claimed (state running, heartbeat fresh) to its end."""
        started = time.monotonic()
        stop = asyncio.Event()
        watcher = asyncio.create_task(self._watch(job_id, stop))
        progress = Progress()
        try:
            await Job(self.deps, job_id, stop=stop, progress=progress).run()
            state, reason = _outcome(progress)
        except Cancelled:
            state = JobState.CANCELLED
            reason = (
                f"cancelled: {progress.stored} of {progress.documents_total} documents stored, none in part"
            )
        except Unusable as exc:
            state, reason = JobState.FAILED, str(exc)
        except Exception as exc:  # the reason is shown to the user; the log has the detail
            log.exception("ingestion_failed", job_id=str(job_id))
            state, reason = JobState.FAILED, f"{type(exc).__name__}: {exc}"[:2000]
        finally:
            await cancel(watcher)
        files = await self._finish(job_id, state, reason=reason, progress=progress)
        seconds = time.monotonic() - started
        self._metrics.observe_ingestion(outcome=state.value, seconds=seconds, chunks=progress.chunks_done)
        await self._remove_uploads(job_id, files)
        if progress.stored:
            await self._after_ingest(job_id)

    async def _watch(self, job_id: uuid.UUID, stop: asyncio.Event) -> None:
        """Renew the heartbeat and hear of a cancel (or of the job going away)."""
        every = min(self.deps.settings.rag.poll_interval_s, self.deps.settings.rag.job_heartbeat_s)
        while True:
            await asyncio.sleep(every)
            try:
                async with transaction(self.deps.sessions) as session:
                    wanted = await heartbeat(session, job_id)
            except Exception:  # a database away for a moment: the next beat tries again
                log.warning("ingestion_heartbeat_failed", job_id=str(job_id), exc_info=True)
                continue
            if wanted is False:
                stop.set()

    async def _finish(
        self, job_id: uuid.UUID, state: JobState, *, reason: str, progress: Progress
    ) -> list[dict[str, Any]]:
        async with transaction(self.deps.sessions) as session:
            job = await session.get(IngestionJob, job_id, with_for_update=True)
            if job is None:  # its base was deleted meanwhile
                return []
            job.state, job.reason, job.finished_at = state, reason, datetime.now(UTC)
            job.progress, job.errors = progress.as_dict(), list(progress.errors)
            await session.flush()
            await job_event(session, job, action=f"ingestion.{state.value}", reason=reason)
            log.info("ingestion_finished", job_id=str(job_id), state=state.value, **progress.as_dict())
            return list(job.source.get("files", [])) if job.source.get("kind") == "upload" else []

    async def _remove_uploads(self, job_id: uuid.UUID, files: list[dict[str, Any]]) -> None:
        """The job's uploaded files, unless a library artifact or another open job has the same bytes."""
        for entry in files:
            digest = str(entry.get("sha256", ""))
            try:
                async with self.deps.sessions() as session:
                    wanted = await upload_wanted(session, digest, job_id=job_id)
                if not wanted:
                    await self.deps.store.delete(digest)
            except Exception:  # a leftover blob costs space, not correctness
                log.warning("ingestion_upload_not_removed", job_id=str(job_id), sha256=digest, exc_info=True)

    async def _after_ingest(self, job_id: uuid.UUID) -> None:
        try:
            async with transaction(self.deps.sessions) as session:
                job = await session.get(IngestionJob, job_id)
                kb = await session.get(KnowledgeBase, job.kb_id, with_for_update=True) if job else None
                if kb is not None:
                    await retrieval.after_ingest(session, kb, self.deps.settings)
        except Exception:  # the base stays searchable exactly; the next job tries again
            log.exception("ingestion_after_ingest_failed", job_id=str(job_id))


def _outcome(progress: Progress) -> tuple[JobState, str]:
    failed = len(progress.errors)
    if progress.documents_total and failed == progress.documents_total:
        return JobState.FAILED, f"every document failed; the first: {progress.errors[0]['reason']}"
    if failed:
        return JobState.SUCCEEDED, f"{failed} of {progress.documents_total} documents failed (see errors)"
    return JobState.SUCCEEDED, ""
