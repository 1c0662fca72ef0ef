from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Identity, Index, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, utcnow


class Event(Base):
    """The outbox: written in the mutation's transaction, then NOTIFY'd; SSE and /events read it.

    `project_id` NULL means organisation-wide: visible to every authenticated principal unless
    `restricted`, then to admins only.
    """

    __tablename__ = "events"
    __table_args__ = (
        # GET /events?project= pages by id; ?kind= matches exactly or by prefix (`deployment.`).
        Index("ix_events_project_id_id", "project_id", "id"),
        Index("ix_events_kind_pattern", "kind", "id", postgresql_ops={"kind": "varchar_pattern_ops"}),
        Index("ix_events_at", "at"),  # retention prunes by age
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    project_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    object_id: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    restricted: Mapped[bool] = mapped_column(Boolean, default=False)
