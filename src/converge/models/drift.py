"""Input drift of V2 deployments: each deployment's reference histograms, and the window
summaries the gateway writes in batches (gateway/drift.py; the maths in core/drift.py)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Uuid
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from converge.kit.ids import new_id
from converge.models.base import Base, utcnow


class DriftReference(Base):
    """What a deployment's inputs are compared with: one histogram per feature.

    `source` is `training` (PUT by a person: histograms or sample rows of the training data;
    kept across revisions) or `first_window` (the first full window the gateway saw after the
    revision `revision` went live; retaken when the revision changes). `version` changes
    whenever the reference is replaced; windows name the version they were counted against.
    `features`: `[{"name", "edges", "counts", "count", "mean", "std"}]`, `edges` the inner
    bin edges (the outer bins are open) and `counts` one more than the edges.
    """

    __tablename__ = "drift_references"

    deployment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[uuid.UUID] = mapped_column(Uuid, default=new_id)
    source: Mapped[str] = mapped_column(String(16))  # training | first_window
    revision: Mapped[int | None] = mapped_column(Integer)  # first_window: the revision it belongs to
    rows: Mapped[int] = mapped_column(BigInteger)
    features: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    created_by: Mapped[str] = mapped_column(String(255))  # a principal's subject, or gateway:<id>
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DriftWindow(Base):
    """One gateway replica's counts of one window of a deployment's inputs.

    Written while open (every flush, `complete` false) and once more when it closes; the id is
    the gateway's, so a retried write replaces rather than duplicates. `features`:
    `[{"name", "count", "mean", "std", "counts", "psi", "ks"}]` against the reference version
    `reference_version` (psi and ks null while open). Pruned after the drift retention.
    """

    __tablename__ = "drift_windows"
    __table_args__ = (Index("ix_drift_windows_deployment_ended", "deployment_id", "ended_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    deployment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    reference_version: Mapped[uuid.UUID] = mapped_column(Uuid)
    gateway_id: Mapped[str] = mapped_column(String(64))
    revision: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # closed, or last written
    complete: Mapped[bool] = mapped_column(Boolean, default=False)
    rows: Mapped[int] = mapped_column(BigInteger)
    features: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
