"""Knowledge bases: their documents, the chunks retrieval reads, and ingestion jobs.

`kb_chunks` is partitioned by knowledge base (LIST on `kb_id`), one partition per base, made
with the base and dropped with it. A base's HNSW index is an index on its own partition only,
so one base's size never costs another's recall or latency: a filtered search in a small base
is an exact scan of that base, never a walk through a big shared index that filters its rows
out. Vectors are stored at full precision (`vector`) for exact search and re-ranking; the HNSW
index is built on `embedding::halfvec(<dim>)`, half the memory.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pgvector.sqlalchemy import VECTOR
from sqlalchemy import (
    BigInteger,
    Boolean,
    Computed,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    PrimaryKeyConstraint,
    Sequence,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TSVECTOR
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, Timestamped, UUIDPk, utcnow

CHUNK_IDS = Sequence("kb_chunks_id_seq")


class KnowledgeBase(UUIDPk, Timestamped, Base):
    __tablename__ = "knowledge_bases"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    # The deployment whose server answers /v1/embeddings; NULL once it was deleted (the base
    # keeps its chunks and searches fail with a message until another one is bound).
    embedding_deployment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("deployments.id", ondelete="SET NULL"), index=True
    )
    dimension: Mapped[int] = mapped_column(Integer)  # read from the model when bound
    max_tokens: Mapped[int] = mapped_column(Integer)  # the model's maximum sequence length
    chunking: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)  # tokens, overlap
    retrieval: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)  # k, mode defaults
    # Index state: "exact" (small: exact scan), "indexed" (HNSW on the partition); ef_search is
    # chosen from the last probe's measured recall.
    index_state: Mapped[str] = mapped_column(String(16), default="exact")
    ef_search: Mapped[int] = mapped_column(Integer, default=40)
    probe: Mapped[dict[str, Any] | None] = mapped_column(JSONB)  # the last recall probe's result
    # Every metadata field some chunk carries: search filters on anything else are refused.
    metadata_keys: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    last_ingested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class KbDocument(UUIDPk, Timestamped, Base):
    """One source file (or object) in a base. Re-ingesting the same source with other content
    replaces its chunks in one transaction; the same content is recognised by its hash."""

    __tablename__ = "kb_documents"
    __table_args__ = (
        UniqueConstraint("kb_id", "source"),
        Index("ix_kb_documents_kb_id_content_hash", "kb_id", "content_hash"),
    )

    kb_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"))
    project_id: Mapped[uuid.UUID] = mapped_column(index=True)
    source: Mapped[str] = mapped_column(String(1024))  # the file name or object URL
    title: Mapped[str] = mapped_column(Text, default="")
    media_type: Mapped[str] = mapped_column(String(64))
    content_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the bytes
    bytes: Mapped[int] = mapped_column(BigInteger)
    pages: Mapped[int | None] = mapped_column(Integer)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, default=dict)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class KbChunk(Base):
    """A passage retrieval returns: its text, where it came from (heading path, page) for
    citations, its vector and its full-text vector. Partitioned by `kb_id` (see the module)."""

    __tablename__ = "kb_chunks"
    __table_args__ = (
        PrimaryKeyConstraint("kb_id", "id"),
        ForeignKeyConstraint(["document_id"], ["kb_documents.id"], ondelete="CASCADE"),
        Index("ix_kb_chunks_document_id", "document_id"),
        Index("ix_kb_chunks_tsv", "tsv", postgresql_using="gin"),
        Index(
            "ix_kb_chunks_metadata",
            "metadata",
            postgresql_using="gin",
            postgresql_ops={"metadata": "jsonb_path_ops"},
        ),
        {"postgresql_partition_by": "LIST (kb_id)"},
    )

    kb_id: Mapped[uuid.UUID] = mapped_column()
    # A sequence, not an identity column: PostgreSQL before 17 has none on partitioned tables.
    id: Mapped[int] = mapped_column(BigInteger, CHUNK_IDS, server_default=CHUNK_IDS.next_value())
    document_id: Mapped[uuid.UUID] = mapped_column()
    ordinal: Mapped[int] = mapped_column(Integer)  # position in the document
    text: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(Integer)
    heading_path: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    page: Mapped[int | None] = mapped_column(Integer)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, default=dict)
    embedding: Mapped[Any] = mapped_column(VECTOR())  # dimension: the base's
    tsv: Mapped[Any] = mapped_column(TSVECTOR, Computed("to_tsvector('english', text)", persisted=True))


class IngestionJob(UUIDPk, Timestamped, Base):
    """Files or an object-storage prefix to ingest into a base: queued, run by the ingestion
    worker, with progress, per-document errors and cancel."""

    __tablename__ = "ingestion_jobs"
    __table_args__ = (Index("ix_ingestion_jobs_state_created_at", "state", "created_at"),)

    kb_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[uuid.UUID] = mapped_column(index=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    # {"kind": "upload", "files": [{"name", "key", "bytes", "sha256"}]} or {"kind": "s3", "url"}
    source: Mapped[dict[str, Any]] = mapped_column(JSONB)
    progress: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)  # [{document, reason}]
    reason: Mapped[str] = mapped_column(Text, default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Who the embeddings are metered to at the gateway: the key that started the job (NULL for
    # the bootstrap token or an OIDC user: the project itself).
    key_id: Mapped[uuid.UUID | None] = mapped_column()
    created_by: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The worker running it renews this; a running job whose heartbeat is stale (its process
    # died) is claimed again by the next worker and resumes (finished documents are skipped).
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
