"""What the gateway measured: one row per inference request, and the shared limit counters."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, utcnow


class UsageRecord(Base):
    """One inference request through the gateway, written in batches (COPY), never per request."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_project_at", "project_id", "at"),
        # Rows arrive in time order: a BRIN index finds the expired ones for a few pages.
        Index("ix_usage_records_at_brin", "at", postgresql_using="brin"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # when the request arrived
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    # History, not references: a key or deployment deleted while its usage waits in a batch
    # must not make the batch fail, and usage outlives them. (No per-row FK checks either.)
    key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    deployment_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    model: Mapped[str] = mapped_column(String(128))  # the name the client asked for
    endpoint: Mapped[str] = mapped_column(String(32))  # chat | completions | embeddings | v2
    status: Mapped[int] = mapped_column(Integer)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)


class GatewayCounter(Base):
    """One gateway replica's own counts for one limit scope and window.

    Each replica writes only its own rows (absolute values, so a retried write is harmless) and
    reads the sum of the others'; see gateway/limits.py for the algorithm and its error bound.
    """

    __tablename__ = "gateway_counters"

    gateway_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope: Mapped[str] = mapped_column(String(48), primary_key=True)  # k:<key id> | p:<project id>
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # minute | month | inflight
    window: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # minute or month number
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
