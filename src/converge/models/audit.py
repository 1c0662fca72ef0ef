from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Identity, Index, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, utcnow


class AuditRecord(Base):
    """Who changed what. No foreign keys: the record outlives what it describes."""

    __tablename__ = "audit_log"
    __table_args__ = (
        # GET /audit pages newest first, by project or action.
        Index("ix_audit_log_project_id_id", "project_id", "id"),
        Index("ix_audit_log_action_id", "action", "id"),
        Index("ix_audit_log_at", "at"),  # retention prunes by age
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(255))
    actor_kind: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64), index=True)
    project_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    object_type: Mapped[str] = mapped_column(String(64))
    object_id: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(64))
    changes: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
