from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, Timestamped, UUIDPk, utcnow


class Project(UUIDPk, Timestamped, Base):
    __tablename__ = "projects"

    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(String(1000), default="")
    # production | staging | development: what the project is for (development may run on spot)
    environment: Mapped[str] = mapped_column(String(16), default="production", server_default="production")
    # {"cpu": cores, "memory_bytes": n, "gpus": n}; absent key = unlimited
    quotas: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    # Gateway limits {"rpm", "tpm", "concurrency", "monthly_tokens"}; absent key = unlimited
    limits: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
