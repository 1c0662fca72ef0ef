"""Policies (CEL rules) and their revision history."""

from __future__ import annotations

import uuid

from sqlalchemy import Boolean, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, Timestamped, UUIDPk


class Policy(UUIDPk, Timestamped, Base):
    """The current revision of a rule; every change also appends a PolicyRevision."""

    __tablename__ = "policies"

    name: Mapped[str] = mapped_column(String(100), unique=True)
    expression: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    effect: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(16), index=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_by: Mapped[str] = mapped_column(String(255))


class PolicyRevision(UUIDPk, Timestamped, Base):
    __tablename__ = "policy_revisions"
    __table_args__ = (UniqueConstraint("policy_id", "revision"),)

    policy_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("policies.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    expression: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    effect: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(16))
    enabled: Mapped[bool] = mapped_column(Boolean)
    author: Mapped[str] = mapped_column(String(255))
