from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, Timestamped, UUIDPk


class Member(UUIDPk, Timestamped, Base):
    """A subject (an OIDC user's subject claim) holding a role in a project."""

    __tablename__ = "members"
    __table_args__ = (UniqueConstraint("project_id", "subject"),)

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    subject: Mapped[str] = mapped_column(String(255), index=True)
    role: Mapped[str] = mapped_column(String(32))
    added_by: Mapped[str] = mapped_column(String(255))
