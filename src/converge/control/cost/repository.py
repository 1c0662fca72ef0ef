"""All SQL for cost: the catalogue's versions, and the library rows an estimate reads."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from converge.models import Artifact, LibraryModel, ModelVersion, PriceCatalogueVersion
from converge.storage.db import advisory_xact_lock

PRICES_LOCK_KEY = 0x43_6F_73_74  # "Cost": one catalogue change at a time, so versions do not collide


async def lock(session: AsyncSession) -> None:
    await advisory_xact_lock(session, PRICES_LOCK_KEY)


async def latest(session: AsyncSession) -> PriceCatalogueVersion | None:
    q = select(PriceCatalogueVersion).order_by(PriceCatalogueVersion.version.desc()).limit(1)
    return await session.scalar(q)


async def get(session: AsyncSession, version: int) -> PriceCatalogueVersion | None:
    return await session.get(PriceCatalogueVersion, version)


async def versions(session: AsyncSession, *, before: int | None, limit: int) -> list[PriceCatalogueVersion]:
    """Newest first; `before` is the last version of the previous page."""
    q = select(PriceCatalogueVersion).order_by(PriceCatalogueVersion.version.desc()).limit(limit + 1)
    if before is not None:
        q = q.where(PriceCatalogueVersion.version < before)
    return list((await session.scalars(q)).all())


async def insert_first(session: AsyncSession, *, catalogue: dict[str, Any], note: str) -> bool:
    """Version 1, unless a version 1 exists (two processes starting together): True if inserted."""
    q = (
        insert(PriceCatalogueVersion)
        .values(version=1, catalogue=catalogue, note=note, created_by="system", created_at=func.now())
        .on_conflict_do_nothing(index_elements=["version"])
        .returning(PriceCatalogueVersion.version)
    )
    return (await session.scalar(q)) is not None


def add(session: AsyncSession, row: PriceCatalogueVersion) -> None:
    session.add(row)


async def model_by_name(session: AsyncSession, name: str) -> LibraryModel | None:
    return await session.scalar(select(LibraryModel).where(LibraryModel.name == name))


async def version_by_name(session: AsyncSession, *, model_id: uuid.UUID, version: str) -> ModelVersion | None:
    q = select(ModelVersion).where(ModelVersion.model_id == model_id, ModelVersion.version == version)
    return await session.scalar(q)


async def newest_version(session: AsyncSession, model_id: uuid.UUID) -> ModelVersion | None:
    """The newest approved version, else the newest of any state."""
    approved_first = case((ModelVersion.state == "approved", 0), else_=1)
    q = (
        select(ModelVersion)
        .where(ModelVersion.model_id == model_id)
        .order_by(approved_first, ModelVersion.created_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )
    return await session.scalar(q)


async def get_version(session: AsyncSession, version_id: uuid.UUID) -> ModelVersion | None:
    return await session.get(ModelVersion, version_id)


async def artifact_size(session: AsyncSession, sha256: str) -> int | None:
    return await session.scalar(select(Artifact.size_bytes).where(Artifact.sha256 == sha256))
