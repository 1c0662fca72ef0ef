"""knowledge bases: documents, chunks partitioned by base, ingestion jobs

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 13:00:00
"""

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import VECTOR
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _stamps(*, created_by: bool = True) -> list[sa.Column]:
    """id, created_at, updated_at (and created_by): fresh columns for each table."""
    columns: list[sa.Column] = [
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    ]
    if created_by:
        columns.insert(0, sa.Column("created_by", sa.String(255), nullable=False))
    return columns


def upgrade() -> None:
    op.create_table(
        "knowledge_bases",
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("embedding_deployment_id", sa.Uuid(), nullable=True),
        sa.Column("dimension", sa.Integer(), nullable=False),
        sa.Column("max_tokens", sa.Integer(), nullable=False),
        sa.Column("chunking", postgresql.JSONB(), nullable=False),
        sa.Column("retrieval", postgresql.JSONB(), nullable=False),
        sa.Column("index_state", sa.String(16), nullable=False),
        sa.Column("ef_search", sa.Integer(), nullable=False),
        sa.Column("probe", postgresql.JSONB(), nullable=True),
        sa.Column("metadata_keys", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("last_ingested_at", sa.DateTime(timezone=True), nullable=True),
        *_stamps(),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_knowledge_bases_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["embedding_deployment_id"],
            ["deployments.id"],
            name=op.f("fk_knowledge_bases_embedding_deployment_id_deployments"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_knowledge_bases")),
        sa.UniqueConstraint("project_id", "name", name=op.f("uq_knowledge_bases_project_id")),
    )
    op.create_index(op.f("ix_knowledge_bases_project_id"), "knowledge_bases", ["project_id"])
    op.create_index(
        op.f("ix_knowledge_bases_embedding_deployment_id"), "knowledge_bases", ["embedding_deployment_id"]
    )

    op.create_table(
        "kb_documents",
        sa.Column("kb_id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("media_type", sa.String(64), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("pages", sa.Integer(), nullable=True),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("metadata", postgresql.JSONB(), nullable=False),
        *_stamps(created_by=False),
        sa.ForeignKeyConstraint(
            ["kb_id"],
            ["knowledge_bases.id"],
            name=op.f("fk_kb_documents_kb_id_knowledge_bases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kb_documents")),
        sa.UniqueConstraint("kb_id", "source", name=op.f("uq_kb_documents_kb_id")),
    )
    op.create_index("ix_kb_documents_kb_id_content_hash", "kb_documents", ["kb_id", "content_hash"])
    op.create_index(op.f("ix_kb_documents_project_id"), "kb_documents", ["project_id"])

    op.execute("CREATE SEQUENCE kb_chunks_id_seq")
    op.create_table(
        "kb_chunks",
        sa.Column("kb_id", sa.Uuid(), nullable=False),
        sa.Column(
            "id", sa.BigInteger(), server_default=sa.text("nextval('kb_chunks_id_seq')"), nullable=False
        ),
        sa.Column("document_id", sa.Uuid(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("heading_path", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("page", sa.Integer(), nullable=True),
        sa.Column("metadata", postgresql.JSONB(), nullable=False),
        sa.Column("embedding", VECTOR(), nullable=False),
        sa.Column(
            "tsv",
            postgresql.TSVECTOR(),
            sa.Computed("to_tsvector('english', text)", persisted=True),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["kb_documents.id"],
            name=op.f("fk_kb_chunks_document_id_kb_documents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("kb_id", "id", name=op.f("pk_kb_chunks")),
        postgresql_partition_by="LIST (kb_id)",
    )
    op.execute("ALTER SEQUENCE kb_chunks_id_seq OWNED BY kb_chunks.id")
    op.create_index("ix_kb_chunks_document_id", "kb_chunks", ["document_id"])
    op.create_index("ix_kb_chunks_tsv", "kb_chunks", ["tsv"], postgresql_using="gin")
    op.create_index(
        "ix_kb_chunks_metadata",
        "kb_chunks",
        ["metadata"],
        postgresql_using="gin",
        postgresql_ops={"metadata": "jsonb_path_ops"},
    )

    op.create_table(
        "ingestion_jobs",
        sa.Column("kb_id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("source", postgresql.JSONB(), nullable=False),
        sa.Column("progress", postgresql.JSONB(), nullable=False),
        sa.Column("errors", postgresql.JSONB(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("key_id", sa.Uuid(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        *_stamps(),
        sa.ForeignKeyConstraint(
            ["kb_id"],
            ["knowledge_bases.id"],
            name=op.f("fk_ingestion_jobs_kb_id_knowledge_bases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingestion_jobs")),
    )
    op.create_index(op.f("ix_ingestion_jobs_kb_id"), "ingestion_jobs", ["kb_id"])
    op.create_index(op.f("ix_ingestion_jobs_project_id"), "ingestion_jobs", ["project_id"])
    op.create_index("ix_ingestion_jobs_state_created_at", "ingestion_jobs", ["state", "created_at"])


def downgrade() -> None:
    op.drop_table("ingestion_jobs")
    op.drop_table("kb_chunks")  # its partitions with it
    op.drop_table("kb_documents")
    op.drop_table("knowledge_bases")
