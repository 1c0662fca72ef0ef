"""Cost: the price catalogue's versions (every change is a new row, the newest is in force),
measured replica-seconds, daily usage roll-ups and project budgets in money."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, utcnow


class PriceCatalogueVersion(Base):
    """One whole catalogue (zones, GPU types, prices) as it stood from `created_at` on."""

    __tablename__ = "price_catalogue_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    catalogue: Mapped[dict[str, Any]] = mapped_column(JSONB)
    note: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReplicaUsageDaily(Base):
    """Seconds that a deployment's replicas ran (starting, ready or draining) on one UTC day, per
    zone and per replica resources: what measured cost multiplies by the catalogue's prices.

    Written by the controller's meter (workers/replica_meter.py), adding to the row. History, not
    references: rows outlive their deployment, so no foreign keys.
    """

    __tablename__ = "replica_usage_daily"
    __table_args__ = (Index("ix_replica_usage_daily_project_day", "project_id", "day"),)

    deployment_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    zone: Mapped[str] = mapped_column(String(63), primary_key=True)
    # sha256 of the canonical JSON of `resources`: one row per shape a replica ran with
    resources_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    resources: Mapped[dict[str, Any]] = mapped_column(JSONB)
    replica_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UsageDaily(Base):
    """The gateway's usage records of one UTC day summed per project and deployment, kept when
    the raw records are pruned (the usage retention). Recomputed whole for a day, so idempotent.
    `deployment_id` is the nil UUID for requests that reached no deployment."""

    __tablename__ = "usage_daily"
    __table_args__ = (Index("ix_usage_daily_project_day", "project_id", "day"),)

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    project_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    deployment_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ProjectBudget(Base):
    """A project's monthly budget in money (the catalogue's currency) for measured cost.

    `alerted` is the highest threshold (80, 100) already announced in `month` (year * 12 + month
    - 1, as the gateway's limits count months); `exceeded` is True while the month's cost is at
    or over the budget, which the gateway refuses on when `enforce` is set.
    """

    __tablename__ = "project_budgets"

    project_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    monthly: Mapped[float] = mapped_column(Float)
    enforce: Mapped[bool] = mapped_column(Boolean, default=False)
    month: Mapped[int] = mapped_column(Integer, default=0)
    alerted: Mapped[int] = mapped_column(Integer, default=0)
    spent: Mapped[float] = mapped_column(Float, default=0.0)
    exceeded: Mapped[bool] = mapped_column(Boolean, default=False)
    checked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
