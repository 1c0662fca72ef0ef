"""Model Library tables: models, versions, approvals, artifacts."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Index, String, Text, UniqueConstraint, Uuid
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, Timestamped, UUIDPk, utcnow


class Artifact(Base, Timestamped):
    """A blob in the content-addressed artifact store; versions point at it by digest."""

    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    is_directory: Mapped[bool] = mapped_column(Boolean, default=False)
    filename: Mapped[str] = mapped_column(String(255), default="")


class LibraryModel(UUIDPk, Timestamped, Base):
    """A model in the organisation-wide library, visible to all projects or to listed ones."""

    __tablename__ = "library_models"
    __table_args__ = (
        Index("ix_library_models_tags", "tags", postgresql_using="gin"),
        # Substring filters on the name (`GET /models?name=`); pg_trgm comes with migration 0007.
        # fastupdate off: new names go straight into the index rather than a pending list that
        # the planner prices as scanned in full, so a batch of new models (a registry sync) does
        # not turn every name search into a sequential scan until autovacuum runs.
        Index(
            "ix_library_models_name_trgm",
            "name",
            postgresql_using="gin",
            postgresql_ops={"name": "gin_trgm_ops"},
            postgresql_with={"fastupdate": "off"},
        ),
    )

    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[list[str]] = mapped_column(ARRAY(String(64)), default=list)
    visibility: Mapped[str] = mapped_column(String(16), default="public")
    projects: Mapped[list[uuid.UUID]] = mapped_column(ARRAY(Uuid), default=list)
    # The project that submitted the model, which may manage it while no other project deploys
    # it; None for the organisation's own (admins, the built-in catalogue, registry sync).
    submitting_project_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("projects.id", ondelete="SET NULL"), index=True
    )
    created_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class ModelVersion(UUIDPk, Timestamped, Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version"),
        Index("ix_model_versions_state_format", "state", "format"),
        Index("ix_model_versions_model_format_state", "model_id", "format", "state"),
    )

    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("library_models.id", ondelete="CASCADE"))
    version: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(32))
    state_reason: Mapped[str] = mapped_column(Text, default="")
    format: Mapped[str] = mapped_column(String(32), default="unknown")
    artifact_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"), index=True)
    source: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)  # kind, uri, known, name, provenance
    inspection: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    scan: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    benchmarks: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    decision: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)  # the registration decision
    submitted_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Approval(UUIDPk, Timestamped, Base):
    __tablename__ = "version_approvals"
    __table_args__ = (UniqueConstraint("version_id", "approver"),)

    version_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    approver: Mapped[str] = mapped_column(String(255))
    verdict: Mapped[str] = mapped_column(String(16))  # approve | reject
    note: Mapped[str] = mapped_column(Text, default="")
    decision: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)  # the approval-scope decision
