from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, Timestamped, UUIDPk


class ApiKey(UUIDPk, Timestamped, Base):
    """An API key: shown once, stored as a peppered hash, found by its public prefix.

    A key with no project is an organisation key (role `admin` or `library-approver`).
    """

    __tablename__ = "api_keys"

    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(100))
    project_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(32))
    created_by: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Gateway limits for this key, as on Project.limits; both the key's and its project's apply
    limits: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
