"""All SQL for knowledge bases, their documents and ingestion jobs (retrieval's own SQL lives
in retrieval.py and probe.py, the partition DDL in storage/vectors.py)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import Artifact, Deployment, IngestionJob, KbChunk, KbDocument, KnowledgeBase
from converge.storage import vectors

# Dropping a partition takes an ACCESS EXCLUSIVE lock on `kb_chunks` itself, and every query of
# any base queues behind a waiting one: wait this long for the table, then give up (a 503)
# rather than stall every search while a long transaction finishes. (Creating one attaches a
# table made alone, which needs only SHARE UPDATE EXCLUSIVE: see storage/vectors.py.)
DDL_LOCK_TIMEOUT = "5s"


async def get(session: AsyncSession, kb_id: uuid.UUID, *, lock: bool = False) -> KnowledgeBase | None:
    q = select(KnowledgeBase).where(KnowledgeBase.id == kb_id)
    if lock:
        q = q.with_for_update()
    return await session.scalar(q)


async def list_for_project(
    session: AsyncSession,
    project_id: uuid.UUID | None,
    *,
    visible: set[uuid.UUID] | None,
    after: uuid.UUID | None,
    limit: int,
) -> list[KnowledgeBase]:
    q = select(KnowledgeBase).order_by(KnowledgeBase.id).limit(limit + 1)
    if project_id is not None:
        q = q.where(KnowledgeBase.project_id == project_id)
    if visible is not None:
        q = q.where(KnowledgeBase.project_id.in_(list(visible)))
    if after is not None:
        q = q.where(KnowledgeBase.id > after)
    return list((await session.scalars(q)).all())


async def stats(session: AsyncSession, kb_ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, int]]:
    """{kb id: {documents, chunks, bytes}} from the documents' own counts, in one query."""
    if not kb_ids:
        return {}
    q = (
        select(
            KbDocument.kb_id,
            func.count(KbDocument.id),
            func.coalesce(func.sum(KbDocument.chunk_count), 0),
            func.coalesce(func.sum(KbDocument.bytes), 0),
        )
        .where(KbDocument.kb_id.in_(kb_ids))
        .group_by(KbDocument.kb_id)
    )
    rows = (await session.execute(q)).all()
    return {kb: {"documents": d, "chunks": int(c), "bytes": int(b)} for kb, d, c, b in rows}


async def deployment_names(session: AsyncSession, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    if not ids:
        return {}
    q = select(Deployment.id, Deployment.name).where(Deployment.id.in_(ids))
    return {did: name for did, name in (await session.execute(q)).all()}


async def deployment_in_project(
    session: AsyncSession, project_id: uuid.UUID, *, deployment_id: uuid.UUID | None, name: str
) -> Deployment | None:
    """A live deployment of the project, by id when the reference is one, else by name."""
    q = select(Deployment).where(Deployment.project_id == project_id, Deployment.deleting.is_(False))
    q = q.where(Deployment.id == deployment_id) if deployment_id else q.where(Deployment.name == name)
    return await session.scalar(q)


async def _with_lock_timeout(session: AsyncSession, statement: Any) -> None:
    await session.execute(text(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))
    await statement
    await session.execute(text("SET LOCAL lock_timeout = DEFAULT"))


async def create_partition(session: AsyncSession, kb_id: uuid.UUID) -> None:
    await _with_lock_timeout(session, vectors.create_partition(session, kb_id))


async def drop_partition(session: AsyncSession, kb_id: uuid.UUID) -> None:
    await _with_lock_timeout(session, vectors.drop_partition(session, kb_id))


async def partition_exists(session: AsyncSession, kb_id: uuid.UUID) -> bool:
    found = await session.scalar(
        text("SELECT to_regclass(:name) IS NOT NULL"), {"name": vectors.partition_name(kb_id)}
    )
    return bool(found)


async def delete_base(session: AsyncSession, kb: KnowledgeBase) -> None:
    """Jobs and documents, then the base (its chunks went with the partition)."""
    await session.execute(delete(IngestionJob).where(IngestionJob.kb_id == kb.id))
    await session.execute(delete(KbDocument).where(KbDocument.kb_id == kb.id))
    await session.delete(kb)
    await session.flush()


# -- documents ---------------------------------------------------------------------------------


async def list_documents(
    session: AsyncSession, kb_id: uuid.UUID, *, after: uuid.UUID | None, limit: int
) -> list[KbDocument]:
    q = select(KbDocument).where(KbDocument.kb_id == kb_id).order_by(KbDocument.id).limit(limit + 1)
    if after is not None:
        q = q.where(KbDocument.id > after)
    return list((await session.scalars(q)).all())


async def get_document(
    session: AsyncSession, *, kb_id: uuid.UUID, document_id: uuid.UUID
) -> KbDocument | None:
    return await session.scalar(
        select(KbDocument).where(KbDocument.kb_id == kb_id, KbDocument.id == document_id)
    )


async def delete_document(session: AsyncSession, document: KbDocument) -> None:
    # The chunks go by the foreign key's cascade, in this transaction.
    await session.execute(
        delete(KbChunk).where(KbChunk.kb_id == document.kb_id, KbChunk.document_id == document.id)
    )
    await session.delete(document)
    await session.flush()


# -- ingestion jobs ----------------------------------------------------------------------------


async def list_jobs(
    session: AsyncSession, kb_id: uuid.UUID, *, after: uuid.UUID | None, limit: int
) -> list[IngestionJob]:
    """Newest first: UUIDv7 ids are time-ordered, so the cursor walks back in time."""
    q = select(IngestionJob).where(IngestionJob.kb_id == kb_id).order_by(IngestionJob.id.desc())
    if after is not None:
        q = q.where(IngestionJob.id < after)
    return list((await session.scalars(q.limit(limit + 1))).all())


async def get_job(
    session: AsyncSession, *, kb_id: uuid.UUID, job_id: uuid.UUID, lock: bool = False
) -> IngestionJob | None:
    q = select(IngestionJob).where(IngestionJob.kb_id == kb_id, IngestionJob.id == job_id)
    if lock:
        q = q.with_for_update()
    return await session.scalar(q)


async def uploads_of(session: AsyncSession, kb_id: uuid.UUID) -> set[str]:
    """The sha256 of every file uploaded to the base's jobs."""
    rows = await session.scalars(select(IngestionJob.source).where(IngestionJob.kb_id == kb_id))
    return {f["sha256"] for source in rows if source.get("kind") == "upload" for f in source.get("files", [])}


async def blob_in_use(session: AsyncSession, sha256: str) -> bool:
    """Whether stored bytes are still wanted: a library artifact, or a file of some job."""
    if await session.scalar(select(Artifact.sha256).where(Artifact.sha256 == sha256)) is not None:
        return True
    q = select(IngestionJob.id).where(IngestionJob.source.contains({"files": [{"sha256": sha256}]}))
    q = q.limit(1)
    return await session.scalar(q) is not None
