"""Deployments (desired state + observed status), their revisions, and builds."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, Timestamped, UUIDPk, utcnow


class Deployment(UUIDPk, Timestamped, Base):
    __tablename__ = "deployments"
    __table_args__ = (
        UniqueConstraint("project_id", "name"),
        Index("ix_deployments_project_id_id", "project_id", "id"),  # GET /deployments pages by id
    )

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    aliases: Mapped[list[str]] = mapped_column(ARRAY(String(128)), default=list)
    model_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("model_versions.id"), index=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)  # the current (desired) revision
    restart_generation: Mapped[int] = mapped_column(Integer, default=0)
    # The revision whose canary was promoted; a new revision is a canary again until promoted.
    promoted_revision: Mapped[int | None] = mapped_column(Integer)
    desired_replicas: Mapped[int] = mapped_column(Integer, default=1)  # the autoscaler's current target
    phase: Mapped[str] = mapped_column(String(32), default="Pending")
    status: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)  # conditions + replicas
    deleting: Mapped[bool] = mapped_column(Boolean, default=False)
    last_active_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class DeploymentRevision(UUIDPk, Timestamped, Base):
    """An immutable spec; every change makes a new one, rollback re-applies an old one."""

    __tablename__ = "deployment_revisions"
    __table_args__ = (UniqueConstraint("deployment_id", "revision"),)

    deployment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), index=True
    )
    revision: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(255))


class Build(UUIDPk, Timestamped, Base):
    """Prepare an approved version for a target profile: fetch, smoke-load, benchmark."""

    __tablename__ = "builds"
    __table_args__ = (  # GET /builds pages by id, within projects or one state
        Index("ix_builds_project_id_id", "project_id", "id"),
        Index("ix_builds_state_id", "state", "id"),
    )

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    profile: Mapped[str] = mapped_column(String(64))
    server: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    results: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(255))
