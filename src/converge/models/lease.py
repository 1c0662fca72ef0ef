"""Leader leases: the fencing epoch of each leader-elected role (see storage/leader.py)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base


class LeaderLease(Base):
    """Bumped by every process that wins a role's leadership; its writes check it is still theirs."""

    __tablename__ = "leader_leases"

    role: Mapped[str] = mapped_column(String(64), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    holder: Mapped[str] = mapped_column(String(255))
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
