"""Registry sources polled by the sync worker, and what each has already produced."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, Timestamped, UUIDPk


class Source(UUIDPk, Timestamped, Base):
    __tablename__ = "sources"

    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # oci | s3 | mlflow
    uri: Mapped[str] = mapped_column(Text)  # oci://host/repo or s3://bucket/prefix
    model_name: Mapped[str] = mapped_column(String(128))  # library model that new versions join
    options: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    interval_s: Mapped[float] = mapped_column(Float, default=60.0)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str] = mapped_column(String(255))
    last_sync_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    next_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)


class SourceItem(UUIDPk, Timestamped, Base):
    """One tag or object seen at one digest: makes sync idempotent."""

    __tablename__ = "source_items"
    __table_args__ = (UniqueConstraint("source_id", "key", "digest"),)

    source_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(512))
    digest: Mapped[str] = mapped_column(String(128))
    version_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
