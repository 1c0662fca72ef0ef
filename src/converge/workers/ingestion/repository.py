"""The ingestion runner's SQL: claiming jobs, heartbeats, the skip checks, and storing one
document (its row, its chunks and the base's metadata keys) in the caller's transaction."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import Settings
from converge.control.events.service import record
from converge.control.rag.schemas import JobState
from converge.kit.ids import new_id
from converge.models import Artifact, IngestionJob, KbChunk, KbDocument, KnowledgeBase

if TYPE_CHECKING:
    from converge.workers.ingestion.pipeline import Prepared


async def job_event(session: AsyncSession, job: IngestionJob, *, action: str, **extra: Any) -> None:
    await record(
        session,
        None,
        action=action,
        project_id=job.project_id,
        object_type="ingestion",
        object_id=job.id,
        changes={
            "kb_id": str(job.kb_id),
            "state": job.state,
            "progress": dict(job.progress or {}),
            "errors": len(job.errors or []),
            **extra,
        },
    )


async def claim_next(session: AsyncSession, *, settings: Settings) -> IngestionJob | None:
    """The oldest queued job, or a running one whose process died (its heartbeat stopped);
    SKIP LOCKED lets several runners share the queue."""
    stale = datetime.now(UTC) - timedelta(seconds=3 * settings.rag.job_heartbeat_s)
    q = (
        select(IngestionJob)
        .where(
            or_(
                IngestionJob.state == JobState.QUEUED,
                and_(
                    IngestionJob.state == JobState.RUNNING,
                    or_(IngestionJob.heartbeat_at.is_(None), IngestionJob.heartbeat_at < stale),
                ),
            )
        )
        .order_by(IngestionJob.created_at)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    job = await session.scalar(q)
    if job is None:
        return None
    resumed = job.state == JobState.RUNNING
    now = datetime.now(UTC)
    job.state, job.heartbeat_at = JobState.RUNNING, now
    job.started_at = job.started_at or now
    job.errors, job.progress = [], {}  # a resumed run counts again (stored documents are skipped)
    await session.flush()
    await job_event(session, job, action="ingestion.running", resumed=resumed)
    return job


async def heartbeat(session: AsyncSession, job_id: uuid.UUID) -> bool:
    """Renew the job's heartbeat; False when it should stop (cancel asked, or no longer running)."""
    result = await session.execute(
        update(IngestionJob)
        .where(IngestionJob.id == job_id, IngestionJob.state == JobState.RUNNING)
        .values(heartbeat_at=func.now())
        .returning(IngestionJob.cancel_requested)
    )
    row = result.first()
    return row is not None and not row[0]


async def documents_with(
    session: AsyncSession, *, kb_id: uuid.UUID, source: str, digest: str
) -> set[tuple[str, str]]:
    """(source, content hash) of the base's documents at this source or with these bytes."""
    rows = await session.execute(
        select(KbDocument.source, KbDocument.content_hash).where(
            KbDocument.kb_id == kb_id, or_(KbDocument.source == source, KbDocument.content_hash == digest)
        )
    )
    return {(s, h) for s, h in rows.all()}


async def store_document(session: AsyncSession, *, kb: KnowledgeBase, prepared: Prepared) -> uuid.UUID:
    """Upsert the document, replace its chunks, widen the base's metadata keys: one transaction."""
    doc = prepared.document
    now = datetime.now(UTC)
    changed = {
        "title": doc.title[:10_000],
        "media_type": doc.media_type,
        "content_hash": prepared.digest,
        "bytes": prepared.size,
        "pages": doc.pages,
        "chunk_count": len(prepared.chunks),
        "metadata": doc.metadata,
        "updated_at": now,
    }
    table = cast(Table, KbDocument.__table__)
    values = pg_insert(table).values(
        id=new_id(),
        kb_id=kb.id,
        project_id=kb.project_id,
        source=prepared.ref.source,
        created_at=now,
        **changed,
    )
    upsert = values.on_conflict_do_update(
        index_elements=["kb_id", "source"], set_={name: values.excluded[name] for name in changed}
    ).returning(table.c.id)
    document_id: uuid.UUID = (await session.execute(upsert)).scalar_one()
    await session.execute(delete(KbChunk).where(KbChunk.kb_id == kb.id, KbChunk.document_id == document_id))
    rows = [
        {
            "kb_id": kb.id,
            "document_id": document_id,
            "ordinal": n,
            "text": c.text,
            "tokens": c.tokens,
            "heading_path": c.heading_path,
            "page": c.page,
            "meta": c.metadata,
            "embedding": prepared.vectors[n],
        }
        for n, c in enumerate(prepared.chunks)
    ]
    await session.execute(insert(KbChunk), rows)
    keys = set(kb.metadata_keys or []) | {key for c in prepared.chunks for key in c.metadata}
    if keys != set(kb.metadata_keys or []):
        kb.metadata_keys = sorted(keys)
    kb.last_ingested_at = now
    await session.flush()
    return document_id


async def upload_wanted(session: AsyncSession, digest: str, *, job_id: uuid.UUID) -> bool:
    """Whether an uploaded file's bytes are still wanted: a library artifact, or a file of
    another job that has not finished."""
    if await session.get(Artifact, digest) is not None:
        return True
    q = (
        select(IngestionJob.id)
        .where(
            IngestionJob.id != job_id,
            IngestionJob.state.in_([JobState.QUEUED, JobState.RUNNING]),
            IngestionJob.source.contains({"files": [{"sha256": digest}]}),
        )
        .limit(1)
    )
    return await session.scalar(q) is not None
