"""One run of one ingestion job: the documents of its source through read, hash, skip,
parse and chunk (in a thread), embed (batches across documents, several in flight), store.

A document is stored once all of its vectors are in, in one transaction, so a batch that was
retried never leaves duplicate chunks and a cancelled run leaves no half document.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.config import Settings
from converge.control.events import repository as events_repo
from converge.control.rag.chunking import Chunk, chunk
from converge.control.rag.embedder import Embedder, EmbeddingFailed
from converge.control.rag.parsing import Document, ParseError, parse
from converge.control.rag.schemas import DEFAULT_OVERLAP, DEFAULT_TOKENS
from converge.control.rag.tokens import model_tokenizer
from converge.errors import AppError
from converge.gateway.api import Gateway
from converge.models import IngestionJob, KnowledgeBase
from converge.storage.artifacts import ArtifactStore
from converge.storage.db import transaction
from converge.workers.ingestion import sources
from converge.workers.ingestion.repository import documents_with, store_document
from converge.workers.ingestion.sources import Unusable

PROGRESS_EVERY_S = 1.0  # at most one progress event a second per job
# Status codes after which no other document would fare better: the job stops.
_JOB_LEVEL = frozenset({401, 403, 404})


class Cancelled(Exception):
    pass


@dataclass(slots=True, eq=False)  # by identity: a batch groups its chunks by document
class Prepared:
    ref: sources.Ref
    digest: str
    size: int
    document: Document
    chunks: list[Chunk]
    vectors: list[list[float] | None]
    remaining: int
    failed: bool = False


@dataclass(slots=True)
class Progress:
    documents_total: int = 0
    documents_done: int = 0
    chunks_total: int = 0
    chunks_done: int = 0
    skipped_unchanged: int = 0
    skipped_duplicate: int = 0
    stored: int = 0  # documents written by this run (not shown)
    errors: list[dict[str, str]] = field(default_factory=list)
    last_event: float = 0.0

    def as_dict(self) -> dict[str, int]:
        return {
            "documents_total": self.documents_total,
            "documents_done": self.documents_done,
            "chunks_total": self.chunks_total,
            "chunks_done": self.chunks_done,
            "skipped_unchanged": self.skipped_unchanged,
            "skipped_duplicate": self.skipped_duplicate,
        }

    def fail(self, source: str, reason: str) -> None:
        self.errors.append({"document": source, "reason": reason})
        self.documents_done += 1


@dataclass(frozen=True, slots=True)
class Deps:
    sessions: async_sessionmaker[AsyncSession]
    settings: Settings
    store: ArtifactStore
    gateway: Gateway | None


class Job:
    """One run of one job: the pipeline of the module's docstring."""

    def __init__(self, deps: Deps, job_id: uuid.UUID, *, stop: asyncio.Event, progress: Progress) -> None:
        self.deps, self.job_id, self.stop, self.progress = deps, job_id, stop, progress
        self.settings = deps.settings.rag
        self._slots = asyncio.Semaphore(self.settings.embed_concurrency)
        self._batches: set[asyncio.Task[None]] = set()
        self._store_lock = asyncio.Lock()
        self._abort: str | None = None
        self._seen: dict[str, str] = {}  # digest -> source, this run

    async def run(self) -> None:
        refs = await self._load()
        self.progress.documents_total = len(refs)
        if not refs:
            raise Unusable(f"nothing to ingest: {self._described} holds no documents")
        await self._save_progress(force=True)
        try:
            await self._pipeline(refs)
        except BaseException:  # stopped (shutdown) or failed: no batch outlives the run
            for task in self._batches:
                task.cancel()
            raise
        finally:
            await asyncio.gather(*self._batches, return_exceptions=True)
        if self.stop.is_set():
            raise Cancelled
        if self._abort:
            raise Unusable(self._abort)

    async def _load(self) -> list[sources.Ref]:
        """The job's base, its model's tokenizer and the documents to ingest."""
        deps = self.deps
        async with deps.sessions() as session:
            job = await session.get(IngestionJob, self.job_id)
            kb = await session.get(KnowledgeBase, job.kb_id) if job else None
            if job is None or kb is None:
                raise Unusable("the job or its knowledge base was deleted")
            if kb.embedding_deployment_id is None:
                raise Unusable(f"knowledge base '{kb.name}' has no embedding deployment (it was deleted)")
            if deps.gateway is None:
                raise Unusable(
                    "this process runs no gateway (gateway.enabled is false); ingestion embeds through it"
                )
            self.kb_id, self.project_id, self.key_id = kb.id, kb.project_id, job.key_id
            self.dimension, self.deployment_id = kb.dimension, kb.embedding_deployment_id
            self.embedder = Embedder(deps.gateway)
            self._described = _describe(job.source)
            try:
                self.tokenizer = await model_tokenizer(session, deps.store, deployment_id=self.deployment_id)
            except AppError as exc:
                raise Unusable(exc.detail) from None
            chunking = dict(kb.chunking or {})
            self.tokens = min(
                int(chunking.get("tokens") or DEFAULT_TOKENS), kb.max_tokens, self.tokenizer.max_tokens
            )
            overlap = chunking.get("overlap")
            self.overlap = int(overlap) if overlap is not None else DEFAULT_OVERLAP
            return await sources.refs(session, job.source, settings=deps.settings, store=deps.store)

    # -- the pipeline ------------------------------------------------------------------------------

    async def _pipeline(self, refs: list[sources.Ref]) -> None:
        pending: list[tuple[Prepared, int]] = []  # chunks waiting for a batch
        batch = self.settings.embed_batch
        for ref in refs:
            if self._stopping():
                return
            prepared = await self._prepare(ref)
            if prepared is None:
                continue
            pending += [(prepared, i) for i in range(len(prepared.chunks))]
            while len(pending) >= batch and not self._stopping():
                await self._launch(pending[:batch])
                del pending[:batch]
        while pending and not self._stopping():
            await self._launch(pending[:batch])
            del pending[:batch]

    def _stopping(self) -> bool:
        return self.stop.is_set() or self._abort is not None

    async def _prepare(self, ref: sources.Ref) -> Prepared | None:
        """Read, hash, skip or parse and chunk; None when the document is done with already."""
        prepared = await self._read_and_chunk(ref)
        if prepared is None:
            await self._save_progress()
        return prepared

    async def _read_and_chunk(self, ref: sources.Ref) -> Prepared | None:
        progress = self.progress
        if ref.size is not None and ref.size > self.settings.max_file_bytes:
            progress.fail(
                ref.source,
                f"{ref.size} bytes is over the limit of {self.settings.max_file_bytes} (rag.max_file_bytes)",
            )
            return None
        try:
            data = await ref.read()
        except Exception as exc:  # noqa: BLE001 - any read failure (store, network) is this document's
            progress.fail(ref.source, f"cannot be read: {exc}")
            return None
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        skip = await self._skip(ref.source, digest)
        if skip is not None:
            setattr(progress, skip, getattr(progress, skip) + 1)
            progress.documents_done += 1
            return None
        try:
            document, chunks = await asyncio.to_thread(self._parse_and_chunk, data, ref.name)
        except ParseError as exc:
            progress.fail(ref.source, str(exc))
            return None
        if not chunks:
            progress.fail(ref.source, "no text the embedding model can read")
            return None
        self._seen[digest] = ref.source
        progress.chunks_total += len(chunks)
        return Prepared(
            ref=ref,
            digest=digest,
            size=len(data),
            document=document,
            chunks=chunks,
            vectors=[None] * len(chunks),
            remaining=len(chunks),
        )

    def _parse_and_chunk(self, data: bytes, name: str) -> tuple[Document, list[Chunk]]:
        document = parse(data, name)
        return document, chunk(document.sections, self.tokenizer, tokens=self.tokens, overlap=self.overlap)

    async def _skip(self, source: str, digest: str) -> str | None:
        """'skipped_unchanged' when this source holds these bytes already, 'skipped_duplicate'
        when another source of the base (or of this run) does, else None."""
        if digest in self._seen:
            return "skipped_duplicate"
        async with self.deps.sessions() as session:
            holders = await documents_with(session, kb_id=self.kb_id, source=source, digest=digest)
        if (source, digest) in holders:
            return "skipped_unchanged"
        if any(h == digest for _, h in holders):
            return "skipped_duplicate"
        return None

    async def _launch(self, items: list[tuple[Prepared, int]]) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._embed(items))
        self._batches.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._batches.discard(t)
            self._slots.release()

        task.add_done_callback(done)

    async def _embed(self, items: list[tuple[Prepared, int]]) -> None:
        live = [(p, i) for p, i in items if not p.failed]
        if not live or self._stopping():
            return
        try:
            vectors = await self._embed_texts([p.chunks[i].text for p, i in live])
        except EmbeddingFailed as exc:
            if exc.status in _JOB_LEVEL or exc.retryable:
                self._abort = f"the embedding deployment failed after {self.settings.embed_retries} retries: {exc.message}"
                return
            await self._embed_apart(live, exc)
            return
        except Exception as exc:
            self._abort = f"embedding failed: {type(exc).__name__}: {exc}"
            return
        await self._fill(live, vectors)

    async def _embed_apart(self, items: list[tuple[Prepared, int]], first: EmbeddingFailed) -> None:
        """A refused batch of several documents: embed each document's part alone, so only the
        document the server refuses fails."""
        docs = list(dict.fromkeys(p for p, _ in items))
        if len(docs) == 1:
            await self._fail_doc(docs[0], f"embedding refused ({first.status}): {first.message}")
            return
        for doc in docs:
            mine = [(p, i) for p, i in items if p is doc]
            try:
                await self._fill(mine, await self._embed_texts([doc.chunks[i].text for _, i in mine]))
            except EmbeddingFailed as exc:
                await self._fail_doc(doc, f"embedding refused ({exc.status}): {exc.message}")

    async def _embed_texts(self, texts: list[str]) -> list[list[float]]:
        attempt = 0
        while True:
            try:
                return await self.embedder.embed(
                    texts, deployment_id=self.deployment_id, project_id=self.project_id, key_id=self.key_id
                )
            except EmbeddingFailed as exc:
                if not exc.retryable or attempt >= self.settings.embed_retries or self._stopping():
                    raise
                await asyncio.sleep(min(10.0, 0.5 * 2**attempt))
                attempt += 1

    async def _fill(self, items: list[tuple[Prepared, int]], vectors: list[list[float]]) -> None:
        if vectors and len(vectors[0]) != self.dimension:
            self._abort = (
                f"the embedding deployment returns {len(vectors[0])} dimensions; the knowledge base holds "
                f"{self.dimension}"
            )
            return
        self.progress.chunks_done += len(items)
        for (prepared, i), vector in zip(items, vectors, strict=True):
            prepared.vectors[i] = vector
            prepared.remaining -= 1
            if prepared.remaining == 0 and not prepared.failed:
                await self._store(prepared)

    async def _fail_doc(self, prepared: Prepared, reason: str) -> None:
        if not prepared.failed:
            prepared.failed = True
            self.progress.fail(prepared.ref.source, reason)
            await self._save_progress()

    async def _store(self, prepared: Prepared) -> None:
        if self._stopping():
            return  # cancelled: what is not stored yet is not stored at all
        async with self._store_lock, transaction(self.deps.sessions) as session:
            kb = await session.get(KnowledgeBase, self.kb_id, with_for_update=True)
            if kb is None:
                self._abort = "the knowledge base was deleted"
                return
            await store_document(session, kb=kb, prepared=prepared)
            self.progress.stored += 1
            self.progress.documents_done += 1
            await self._write_progress(session, force=False)

    async def _save_progress(self, *, force: bool = False) -> None:
        async with transaction(self.deps.sessions) as session:
            await self._write_progress(session, force=force)

    async def _write_progress(self, session: AsyncSession, *, force: bool) -> None:
        """The job's progress and errors in this transaction; an event at most once a second."""
        progress = self.progress
        await session.execute(
            update(IngestionJob)
            .where(IngestionJob.id == self.job_id)
            .values(progress=progress.as_dict(), errors=list(progress.errors), heartbeat_at=func.now())
        )
        now = time.monotonic()
        if force or now - progress.last_event >= PROGRESS_EVERY_S:
            progress.last_event = now
            events_repo.queue_event(
                session,
                project_id=self.project_id,
                kind="ingestion.progress",
                object_id=str(self.job_id),
                data={
                    "kb_id": str(self.kb_id),
                    "progress": progress.as_dict(),
                    "errors": len(progress.errors),
                },
            )


def _describe(source: dict[str, Any]) -> str:
    return str(source.get("url")) if source.get("kind") == "s3" else "the upload"
